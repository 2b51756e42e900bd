// Opens a walrelay dashboard in Debian's Chromium, headless, at a laptop's
// and at a phone's size; saves a full-page screenshot of each; and prints,
// as one JSON object on stdout, what the page shows and how it is laid out:
//
//   node tests/browser/dashboard.mjs URL SCREENSHOT_PREFIX
//
// For each size: the page's own account of its charts
// (window.walrelayDashboard: each series, its Prometheus metric, how many
// readings it holds and since when), the y-axis tick labels drawn, words
// broken across lines, boxes whose content overflows, the lowest text
// contrast, requests that left the process, and script errors.
// tests/dashboard.rs asserts on them.
import { chromium } from "playwright-core";

const [url, prefix] = process.argv.slice(2);
if (!url || !prefix) {
  console.error("usage: node tests/browser/dashboard.mjs URL SCREENSHOT_PREFIX");
  process.exit(2);
}
const origin = new URL(url).origin;

// The flags of tests/support/mod.rs::chromium: offline, no first-run noise.
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});

const SIZES = [
  { name: "laptop", viewport: { width: 1366, height: 900 }, deviceScaleFactor: 1, isMobile: false },
  { name: "phone", viewport: { width: 390, height: 844 }, deviceScaleFactor: 2, isMobile: true },
];

// Runs in the page: the layout's faults.
function inspect() {
  const visible = (e) => {
    for (let x = e; x; x = x.parentElement) {
      const s = getComputedStyle(x);
      if (s.display === "none" || s.visibility === "hidden") return false;
    }
    return true;
  };
  // A word whose letters sit on two lines was broken.
  const broken = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  const range = document.createRange();
  while (walker.nextNode()) {
    const node = walker.currentNode;
    const parent = node.parentElement;
    if (!parent || parent.closest("script, style") || !visible(parent)) continue;
    const re = /\S+/g;
    let m;
    while ((m = re.exec(node.textContent))) {
      range.setStart(node, m.index);
      range.setEnd(node, m.index + m[0].length);
      const tops = new Set([...range.getClientRects()].filter((r) => r.width > 0).map((r) => Math.round(r.top)));
      if (tops.size > 1) broken.push(m[0]);
    }
  }
  const overflowing = [...document.querySelectorAll("header, .card, .panel, .badge, .value, .sub, .u-legend")]
    .filter((e) => visible(e) && e.scrollWidth > e.clientWidth + 1)
    .map((e) => e.className + ": " + e.textContent.trim().slice(0, 80));
  // WCAG contrast of each visible text against the background behind it.
  const rgb = (c) => (c.match(/[\d.]+/g) || []).map(Number);
  const lum = ([r, g, b]) => {
    const f = (v) => ((v /= 255) <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4);
    return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
  };
  const background = (e) => {
    for (let x = e; x; x = x.parentElement) {
      const c = rgb(getComputedStyle(x).backgroundColor);
      if (c.length === 3 || (c.length === 4 && c[3] > 0.5)) return c.slice(0, 3);
    }
    return [255, 255, 255];
  };
  let lowest = { ratio: 99, text: "" };
  for (const e of document.querySelectorAll("body *")) {
    if (![...e.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim()) || !visible(e)) continue;
    const a = lum(rgb(getComputedStyle(e).color)), b = lum(background(e));
    const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
    if (ratio < lowest.ratio) lowest = { ratio, text: e.textContent.trim().slice(0, 60) };
  }
  return {
    broken,
    overflowing,
    pageWiderThanScreen: document.documentElement.scrollWidth > window.innerWidth + 1,
    lowestContrast: lowest,
  };
}

const report = { url, sizes: [] };
for (const size of SIZES) {
  const context = await browser.newContext({
    viewport: size.viewport, deviceScaleFactor: size.deviceScaleFactor, isMobile: size.isMobile, hasTouch: size.isMobile,
  });
  const page = await context.newPage();
  const external = [];
  const errors = [];
  page.on("request", (r) => { if (!r.url().startsWith(origin)) external.push(r.url()); });
  page.on("pageerror", (e) => errors.push(String(e.stack || e)));
  page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });
  const openedAt = Date.now();
  await page.goto(url);
  await page.waitForFunction(() => document.body.dataset.ready === "1", null, { timeout: 20000 });
  // Two more refreshes: the incremental path runs too.
  const samples = await page.evaluate(() => window.walrelayDashboard.samples);
  await page.waitForFunction((n) => window.walrelayDashboard.samples >= n + 2, samples, { timeout: 20000 });
  const dashboard = await page.evaluate(() => window.walrelayDashboard);
  const layout = await page.evaluate(inspect);
  const screenshot = `${prefix}-${size.name}.png`;
  await page.screenshot({ path: screenshot, fullPage: true });
  report.sizes.push({
    name: size.name, viewport: size.viewport, openedAt, dashboard, layout, external, errors, screenshot,
    text: await page.evaluate(() => document.body.innerText),
  });
  await context.close();
}
await browser.close();
console.log(JSON.stringify(report));
