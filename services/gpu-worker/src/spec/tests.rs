#![allow(clippy::unwrap_used)]

use super::*;

const VALID: &str = r#"{"architecture":"mlp","input_dim":4,"hidden":[8],"output_dim":2,
    "activation":"relu","output":"logits"}"#;

const BERT: &str = r#"{"architecture":"bert_encoder","vocab_size":100,"hidden":32,
    "layers":2,"heads":4,"intermediate":64,"max_position":40}"#;

#[test]
fn a_minimal_spec_gets_defaults() {
    let ModelSpec::Mlp(spec) = ModelSpec::parse(VALID).unwrap() else {
        panic!("not an MLP")
    };
    assert_eq!(spec.input_name, "INPUT");
    assert_eq!(spec.output_name, "OUTPUT");
    assert_eq!(spec.device, DevicePreference::Auto);
    assert_eq!(spec.dtype, DType::Float32);
    assert_eq!(spec.layer_dims(), vec![(4, 8), (8, 2)]);
}

#[test]
fn a_minimal_encoder_spec_gets_defaults() {
    let spec = ModelSpec::parse(BERT).unwrap();
    assert_eq!(spec.architecture(), "bert_encoder");
    let ModelSpec::BertEncoder(spec) = spec else {
        panic!("not an encoder")
    };
    assert_eq!(spec.type_vocab_size, 2);
    assert_eq!(spec.layer_norm_eps, 1e-12);
    assert_eq!(spec.pooling, Pooling::Mean);
    assert!(spec.normalize);
    assert_eq!(spec.max_seq_len(), 40);
    assert_eq!(spec.head_dim(), 8);
    assert_eq!(spec.inputs, EncoderInputs::TokenIds);
    assert_eq!(spec.dtype, DType::Float32);
    // The spec round-trips through its JSON form (as embedded in
    // safetensors metadata).
    let text = serde_json::to_string(&ModelSpec::BertEncoder(spec.clone())).unwrap();
    assert!(text.contains("\"architecture\":\"bert_encoder\""), "{text}");
    assert_eq!(
        ModelSpec::parse(&text).unwrap(),
        ModelSpec::BertEncoder(spec)
    );
}

#[test]
fn invalid_specs_name_the_field() {
    let cases = [
        (
            VALID.replace("\"mlp\"", "\"bert\""),
            "unknown variant `bert`",
        ),
        (
            VALID.replace("\"input_dim\":4", "\"input_dim\":0"),
            "input_dim",
        ),
        (VALID.replace("[8]", "[8, 0]"), "hidden"),
        (VALID.replace("\"relu\"", "\"swish\""), "swish"),
        (VALID.replace("\"logits\"", "\"argmax\""), "argmax"),
        (
            VALID.replace("\"output\"", "\"dtype\":\"float8\",\"output\""),
            "float8",
        ),
        (
            VALID.replace("\"output\"", "\"extra\":1,\"output\""),
            "extra",
        ),
        (
            VALID.replace("\"output\"", "\"weights\":\"../x\",\"output\""),
            "weights",
        ),
        (VALID.replace(",\"output_dim\":2", ""), "output_dim"),
        (
            BERT.replace("\"heads\":4", "\"heads\":5"),
            "multiple of heads",
        ),
        (BERT.replace("\"layers\":2", "\"layers\":0"), "layers"),
        (BERT.replace("\"vocab_size\":100,", ""), "vocab_size"),
        (
            BERT.replace(
                "\"max_position\":40",
                "\"max_position\":40,\"max_seq_len\":41",
            ),
            "max_seq_len",
        ),
        (
            BERT.replace(
                "\"max_position\":40",
                "\"max_position\":40,\"pooling\":\"cls\"",
            ),
            "cls",
        ),
        (
            BERT.replace(
                "\"max_position\":40",
                "\"max_position\":40,\"layer_norm_eps\":0",
            ),
            "layer_norm_eps",
        ),
        (
            BERT.replace(
                "\"max_position\":40",
                "\"max_position\":40,\"tokenizer\":\"t.json\"",
            ),
            "only used with",
        ),
        (
            BERT.replace(
                "\"max_position\":40",
                "\"max_position\":40,\"inputs\":\"text\",\"tokenizer\":\"/etc/t.json\"",
            ),
            "tokenizer",
        ),
        (
            BERT.replace("\"max_position\":40", "\"max_position\":40,\"input_dim\":3"),
            "input_dim",
        ),
    ];
    for (text, expected) in cases {
        let error = ModelSpec::parse(&text).unwrap_err().to_string();
        assert!(error.contains(expected), "{expected}: {error}");
    }
}

/// The messages are part of the contract (operators read them in the model's
/// load failure, docs quote them): the typed errors keep the wording the
/// string errors had.
#[test]
fn error_messages_keep_their_wording() {
    let message = |text: String| ModelSpec::parse(&text).unwrap_err().to_string();
    assert_eq!(
        message(BERT.replace(
            "\"max_position\":40",
            "\"max_position\":40,\"max_seq_len\":41"
        )),
        "model spec: max_seq_len is 41; it must be within 1..=40 \
         (max_seq_len may not exceed max_position)"
    );
    assert_eq!(
        message(VALID.replace("\"input_dim\":4", "\"input_dim\":0")),
        "model spec: input_dim is 0; it must be within 1..=1048576"
    );
    assert_eq!(
        message(VALID.replace("\"output\"", "\"weights\":\"../x\",\"output\"")),
        "model spec: weights '../x' must be a file name in the version directory"
    );
    assert_eq!(
        message(BERT.replace(
            "\"max_position\":40",
            "\"max_position\":40,\"tokenizer\":\"t.json\""
        )),
        "model spec: tokenizer is only used with \"inputs\": \"text\""
    );
    let missing = std::env::temp_dir().join("shamal-spec-test-missing.safetensors");
    let error = read_spec(&missing).unwrap_err().to_string();
    assert!(
        error.starts_with(&format!("cannot read {}: ", missing.display())),
        "{error}"
    );
}
