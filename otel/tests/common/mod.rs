//! What the export tests share: a processor that, with the global tracer and
//! meter `init` installed, makes a `send Greet` span, a `greetings publish`
//! span and the sent-messages metric.

use brighter_core::{
    Command, CommandProcessor, Error, Handler, InMemoryBroker, Publication, Request, RequestContext,
};

#[derive(serde::Serialize, serde::Deserialize)]
struct Greet {
    id: uuid::Uuid,
}
impl Request for Greet {
    fn id(&self) -> uuid::Uuid {
        self.id
    }
}
impl Command for Greet {}

struct Greeter;
impl Handler<Greet> for Greeter {
    async fn handle(&self, _: &Greet, _: &mut RequestContext) -> Result<(), Error> {
        Ok(())
    }
}

/// Sends a `Greet` to its handler and posts one to an in-memory broker, on
/// `runtime`, through a processor built now (so it takes the global tracer
/// and meter).
pub(crate) fn send_and_post(runtime: &tokio::runtime::Runtime) {
    let broker = InMemoryBroker::new();
    broker
        .declare("greetings", "nobody")
        .expect("declare the queue");
    let processor = CommandProcessor::builder()
        .command(Greeter)
        .publication::<Greet>(Publication::command("greetings"))
        .producer(broker)
        .build()
        .expect("build the processor");
    runtime.block_on(async {
        processor
            .send(&Greet {
                id: uuid::Uuid::now_v7(),
            })
            .await
            .expect("send");
        processor
            .post(&Greet {
                id: uuid::Uuid::now_v7(),
            })
            .await
            .expect("post");
    });
}
