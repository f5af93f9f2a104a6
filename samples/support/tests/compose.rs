//! docker-compose.yml, which users run the samples against: it parses, and has
//! the services, ports, health checks and settings the samples and the README
//! rely on.

#![allow(clippy::unwrap_used)]

use yaml_rust2::{Yaml, YamlLoader};

fn compose() -> Yaml {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docker-compose.yml");
    let text = std::fs::read_to_string(path).unwrap();
    YamlLoader::load_from_str(&text)
        .unwrap()
        .into_iter()
        .next()
        .unwrap()
}

fn ports(service: &Yaml) -> Vec<String> {
    service["ports"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_owned())
        .collect()
}

fn env(service: &Yaml, name: &str) -> String {
    let value = &service["environment"][name];
    match value {
        Yaml::String(s) => s.clone(),
        Yaml::Integer(i) => i.to_string(),
        other => panic!("{name}: {other:?}"),
    }
}

#[test]
fn compose_file_has_the_services_ports_and_health_checks_the_samples_need() {
    let compose = compose();
    let services = &compose["services"];
    let expected = [
        ("kafka", vec!["9092:9092"]),
        ("rabbitmq", vec!["5672:5672", "15672:15672"]),
        ("postgres", vec!["5432:5432"]),
        ("jaeger", vec!["16686:16686", "4317:4317", "4318:4318"]),
        ("shop", vec!["8080:8080"]),
    ];
    for (name, wanted) in expected {
        let service = &services[name];
        assert!(!service.is_badvalue(), "service {name} missing");
        if name != "shop" {
            // Pinned: a tag with a version number, never `latest`.
            let image = service["image"]
                .as_str()
                .unwrap_or_else(|| panic!("{name} has no image"));
            let tag = image.rsplit_once(':').map(|(_, tag)| tag).unwrap_or("");
            assert!(
                tag.starts_with(|c: char| c.is_ascii_digit()),
                "{name}'s image is not pinned: {image}"
            );
        }
        let published = ports(service);
        for port in wanted {
            assert!(
                published.iter().any(|p| p == port),
                "{name} does not publish {port}: {published:?}"
            );
        }
        assert!(
            service["healthcheck"]["test"]
                .as_vec()
                .is_some_and(|t| !t.is_empty()),
            "{name} has no health check"
        );
    }

    let kafka = &services["kafka"];
    assert!(
        kafka["image"]
            .as_str()
            .unwrap()
            .starts_with("apache/kafka:4.")
    );
    assert!(
        env(kafka, "KAFKA_PROCESS_ROLES").contains("controller"),
        "KRaft mode"
    );
    // One listener for the host, one for other containers.
    let advertised = env(kafka, "KAFKA_ADVERTISED_LISTENERS");
    assert!(advertised.contains("HOST://127.0.0.1:9092"), "{advertised}");
    assert!(advertised.contains("DOCKER://kafka:19092"), "{advertised}");
    let listeners = env(kafka, "KAFKA_LISTENERS");
    assert!(listeners.contains("HOST://:9092") && listeners.contains("DOCKER://:19092"));
    assert!(env(kafka, "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP").contains("DOCKER:PLAINTEXT"));
    assert_eq!(
        env(kafka, "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"),
        "1",
        "single node"
    );

    let rabbitmq = services["rabbitmq"]["image"].as_str().unwrap();
    assert!(rabbitmq.starts_with("rabbitmq:4.") && rabbitmq.contains("management"));
    assert!(
        services["postgres"]["image"]
            .as_str()
            .unwrap()
            .starts_with("postgres:17")
    );
    assert_eq!(
        env(&services["postgres"], "POSTGRES_HOST_AUTH_METHOD"),
        "trust"
    );
    assert!(
        services["jaeger"]["image"]
            .as_str()
            .unwrap()
            .starts_with("jaegertracing/jaeger:2.")
    );

    // The shop, built from the repository, talking to the others by their
    // container names.
    let shop = &services["shop"];
    let dockerfile = shop["build"]["dockerfile"].as_str().unwrap();
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    assert!(
        std::path::Path::new(root).join(dockerfile).is_file(),
        "{dockerfile} missing"
    );
    assert_eq!(env(shop, "KAFKA_BROKERS"), "kafka:19092");
    assert_eq!(env(shop, "SHOP_TRANSPORT"), "kafka");
    assert_eq!(
        env(shop, "OTEL_EXPORTER_OTLP_ENDPOINT"),
        "http://jaeger:4318"
    );
    assert!(env(shop, "DATABASE_URL").contains("@postgres:5432"));
    assert_eq!(env(shop, "SHOP_ADDR"), "0.0.0.0:8080");
    for dependency in ["kafka", "postgres", "jaeger"] {
        assert!(
            !shop["depends_on"][dependency].is_badvalue(),
            "shop does not depend on {dependency}"
        );
    }
}
