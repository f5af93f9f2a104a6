//! Saga instances in memory, for samples and users' tests.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;

use crate::error::Error;
use crate::memory::InMemoryTransaction;
use crate::store::saga::{SagaInstance, SagaStore};
use crate::store::{Transaction, downcast_transaction};
use crate::sync::lock;

type Key = (String, String);

/// A new version of an instance, applied when its step's transaction commits.
type Pending = Arc<Mutex<Option<SagaInstance>>>;

#[derive(Debug, Default)]
struct Sagas {
    instances: Mutex<HashMap<Key, SagaInstance>>,
    /// One lock per instance, held by the step that loaded it until its
    /// transaction commits or is dropped.
    locks: Mutex<HashMap<Key, Arc<tokio::sync::Mutex<()>>>>,
    /// What the step holding an instance saved, by instance.
    pending: Mutex<HashMap<Key, Pending>>,
}

/// Saga instances in memory, with the in-memory outbox and inbox joining its
/// transactions ([`InMemoryTransaction`]): for samples and users' tests. A
/// step locks its instance from `load` until its transaction commits or is
/// dropped. Nothing survives the process.
///
/// ```
/// use brighter_core::{InMemorySagaStore, SagaStore};
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let store = InMemorySagaStore::new();
/// let mut tx = store.begin().await.unwrap();
/// let mut order = store.load(tx.as_mut(), "order", "o-1", true).await.unwrap().unwrap();
/// assert!(order.is_new());
/// order.state = serde_json::json!({"status": "placed"});
/// store.save(tx.as_mut(), &order).await.unwrap();
/// assert!(store.get("order", "o-1").await.unwrap().is_none(), "not before the commit");
/// store.commit(tx).await.unwrap();
/// assert_eq!(store.get("order", "o-1").await.unwrap().unwrap().version, 1);
/// # });
/// ```
#[derive(Debug, Clone, Default)]
pub struct InMemorySagaStore {
    sagas: Arc<Sagas>,
}

impl InMemorySagaStore {
    /// An empty store.
    pub fn new() -> Self {
        InMemorySagaStore::default()
    }

    /// Every instance, for tests.
    pub fn instances(&self) -> Vec<SagaInstance> {
        let mut all: Vec<SagaInstance> = lock(&self.sagas.instances).values().cloned().collect();
        all.sort_by(|a, b| (&a.saga, &a.key).cmp(&(&b.saga, &b.key)));
        all
    }
}

fn memory_tx(tx: &mut dyn Transaction) -> Result<&mut InMemoryTransaction, Error> {
    downcast_transaction::<InMemoryTransaction>(tx, "the in-memory saga store")
}

#[async_trait]
impl SagaStore for InMemorySagaStore {
    async fn begin(&self) -> Result<Box<dyn Transaction>, Error> {
        Ok(Box::new(InMemoryTransaction::new()))
    }

    async fn load(
        &self,
        tx: &mut dyn Transaction,
        saga: &str,
        key: &str,
        create: bool,
    ) -> Result<Option<SagaInstance>, Error> {
        let tx = memory_tx(tx)?;
        let id: Key = (saga.to_owned(), key.to_owned());
        let instance_lock = Arc::clone(lock(&self.sagas.locks).entry(id.clone()).or_default());
        let guard = instance_lock.lock_owned().await;
        let current = lock(&self.sagas.instances).get(&id).cloned();
        let instance = match current {
            Some(instance) => instance,
            None if create => SagaInstance::new(saga, key),
            None => return Ok(None),
        };
        let pending: Pending = Arc::new(Mutex::new(None));
        lock(&self.sagas.pending).insert(id.clone(), Arc::clone(&pending));
        let sagas = Arc::clone(&self.sagas);
        // One closure, in this order: the saved version is in place before
        // the lock is released, so the next step of the instance reads it.
        tx.on_commit(move || {
            if let Some(saved) = lock(&pending).take() {
                lock(&sagas.instances).insert(id, saved);
            }
            drop(guard);
        });
        Ok(Some(instance))
    }

    async fn save(&self, tx: &mut dyn Transaction, instance: &SagaInstance) -> Result<i64, Error> {
        memory_tx(tx)?;
        let id: Key = (instance.saga.clone(), instance.key.clone());
        let stored = lock(&self.sagas.instances)
            .get(&id)
            .map_or(0, |stored| stored.version);
        if stored != instance.version {
            return Err(Error::store(
                "save a saga instance",
                format!(
                    "instance {}/{} is at version {stored}, not {}: another step saved it first",
                    instance.saga, instance.key, instance.version
                ),
            ));
        }
        let pending = lock(&self.sagas.pending).get(&id).cloned().ok_or_else(|| {
            Error::configuration(format!(
                "saga instance {}/{} is saved without having been loaded in this transaction",
                instance.saga, instance.key
            ))
        })?;
        let mut saved = instance.clone();
        saved.version += 1;
        saved.updated = Utc::now();
        let version = saved.version;
        *lock(&pending) = Some(saved);
        Ok(version)
    }

    async fn commit(&self, tx: Box<dyn Transaction>) -> Result<(), Error> {
        match tx.into_any().downcast::<InMemoryTransaction>() {
            Ok(tx) => {
                tx.commit();
                Ok(())
            }
            Err(_) => Err(Error::configuration(
                "the in-memory saga store commits only the transactions it began",
            )),
        }
    }

    async fn get(&self, saga: &str, key: &str) -> Result<Option<SagaInstance>, Error> {
        Ok(lock(&self.sagas.instances)
            .get(&(saga.to_owned(), key.to_owned()))
            .cloned())
    }

    async fn delete_ended(&self, older_than: Duration) -> Result<u64, Error> {
        let cutoff = chrono::TimeDelta::from_std(older_than)
            .ok()
            .and_then(|age| Utc::now().checked_sub_signed(age))
            .unwrap_or(chrono::DateTime::<Utc>::MIN_UTC);
        let mut instances = lock(&self.sagas.instances);
        let before = instances.len();
        instances.retain(|_, i| !(i.status.has_ended() && i.updated < cutoff));
        Ok((before - instances.len()) as u64)
    }
}
