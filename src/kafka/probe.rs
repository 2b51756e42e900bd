//! The broker probe behind `/readyz`: every two seconds, whether a broker
//! answers a metadata request. Each process decides what an answer means
//! for it (its readiness); the probe only asks.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;

use super::ProducerSettings;
use crate::shutdown::Shutdown;

/// How often the broker is asked.
const INTERVAL: Duration = Duration::from_secs(2);

/// How long one metadata request may take.
const TIMEOUT: Duration = Duration::from_secs(3);

/// Asks the brokers of `producer` every [`INTERVAL`] until `shutdown`,
/// handing each answer (reachable or not) to `answered`. An error is a
/// client that cannot be made from the settings.
pub fn spawn(
    producer: &ProducerSettings,
    mut shutdown: Shutdown,
    answered: impl Fn(bool) + Send + 'static,
) -> Result<(), String> {
    let config = producer.client_config()?;
    let admin: Arc<AdminClient<DefaultClientContext>> =
        Arc::new(config.create().map_err(|e| e.to_string())?);
    tokio::spawn(async move {
        loop {
            let admin = Arc::clone(&admin);
            let ask = tokio::task::spawn_blocking(move || {
                admin.inner().fetch_metadata(None, TIMEOUT).is_ok()
            });
            let Some(reachable) = shutdown.unless(ask).await else {
                return;
            };
            answered(reachable.unwrap_or(false));
            if !shutdown.sleep(INTERVAL).await {
                return;
            }
        }
    });
    Ok(())
}
