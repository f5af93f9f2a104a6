//! The feature switch step: runs or skips the handler, decided when the pipeline
//! is declared or by configuration at run time.

use std::any::type_name;
use std::sync::Arc;

use super::{Resources, Step};
use crate::command::handler::Handler;
use crate::error::Error;
use crate::{Request, RequestContext};

/// Run-time feature configuration, registered with the processor builder.
/// Any `Fn(&str) -> bool` is one.
pub trait FeatureFlags: Send + Sync + 'static {
    /// Whether the feature is on now.
    fn is_enabled(&self, feature: &str) -> bool;
}

impl<F: Fn(&str) -> bool + Send + Sync + 'static> FeatureFlags for F {
    fn is_enabled(&self, feature: &str) -> bool {
        self(feature)
    }
}

/// Step: on, off, or decided per request by the processor's [`FeatureFlags`].
/// When off, the handler is skipped, the request succeeds, and the reason is logged.
#[derive(Debug, Clone)]
#[must_use]
pub enum FeatureSwitch {
    /// Always run the handler.
    On,
    /// Never run the handler.
    Off,
    /// Ask the processor's feature flags for this feature on each request; building
    /// the processor fails if no feature flags were configured.
    Configured(String),
}

impl FeatureSwitch {
    /// A switch decided at run time by the feature named `feature`.
    pub fn configured(feature: impl Into<String>) -> Self {
        FeatureSwitch::Configured(feature.into())
    }
}

enum Decision {
    On,
    Off,
    Flag {
        feature: String,
        flags: Arc<dyn FeatureFlags>,
    },
}

/// The handler made by [`FeatureSwitch`].
pub struct FeatureSwitchHandler<H> {
    inner: H,
    decision: Decision,
}

impl<H: Send + 'static> Step<H> for FeatureSwitch {
    type Handler = FeatureSwitchHandler<H>;

    fn wrap(self, inner: H, resources: &Resources) -> Result<Self::Handler, Error> {
        let decision = match self {
            FeatureSwitch::On => Decision::On,
            FeatureSwitch::Off => Decision::Off,
            FeatureSwitch::Configured(feature) => {
                let flags = resources.feature_flags().cloned().ok_or_else(|| {
                    Error::configuration(format!(
                        "pipeline uses feature switch '{feature}' but no feature flags are configured"
                    ))
                })?;
                Decision::Flag { feature, flags }
            }
        };
        Ok(FeatureSwitchHandler { inner, decision })
    }
}

impl<R: Request, H: Handler<R>> Handler<R> for FeatureSwitchHandler<H> {
    async fn handle(&self, request: &R, ctx: &mut RequestContext) -> Result<(), Error> {
        match &self.decision {
            Decision::On => {}
            Decision::Off => {
                tracing::info!(
                    request.r#type = type_name::<R>(),
                    request.id = %request.id(),
                    reason = "feature switched off in the pipeline",
                    "handler skipped"
                );
                return Ok(());
            }
            Decision::Flag { feature, flags } => {
                if !flags.is_enabled(feature) {
                    tracing::info!(
                        request.r#type = type_name::<R>(),
                        request.id = %request.id(),
                        feature = %feature,
                        reason = "feature flag is off",
                        "handler skipped"
                    );
                    return Ok(());
                }
            }
        }
        self.inner.handle(request, ctx).await
    }
}
