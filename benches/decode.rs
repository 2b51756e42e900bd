//! Decoder throughput on a realistic outbox Insert (about 300 bytes).

use bytes::{BufMut, Bytes, BytesMut};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use walrelay::pgoutput::{LogicalMessage, decode};

/// An Insert into the default outbox table, as the server encodes it.
fn outbox_insert() -> Bytes {
    let columns: [&[u8]; 7] = [
        b"6f1c1a52-8d7b-4f3e-9a51-2b0c7e4d9f10",
        b"order",
        b"order-000042",
        b"OrderCreated",
        br#"{"order_id": "order-000042", "customer": {"id": 12345, "email": "someone@example.com"}, "items": [{"sku": "SKU-1", "qty": 2, "price": 12.5}, {"sku": "SKU-2", "qty": 1, "price": 99.0}], "currency": "EUR", "total": 124.0}"#,
        br#"{"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}"#,
        b"2026-11-23 08:32:03.123456+00",
    ];
    let mut b = BytesMut::new();
    b.put_u8(b'I');
    b.put_u32(16384);
    b.put_u8(b'N');
    b.put_i16(columns.len() as i16);
    for c in columns {
        b.put_u8(b't');
        b.put_i32(c.len() as i32);
        b.put_slice(c);
    }
    b.freeze()
}

fn bench(c: &mut Criterion) {
    let insert = outbox_insert();
    let mut group = c.benchmark_group("pgoutput");
    group.throughput(Throughput::Elements(1));
    group.bench_function(
        format!("decode_outbox_insert_{}_bytes", insert.len()),
        |b| {
            b.iter(|| {
                let message = decode(black_box(&insert), false).unwrap();
                assert!(matches!(message, LogicalMessage::Insert(_)));
                message
            })
        },
    );
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
