//! Model inputs and the check of a dataset's schema against them.

use arrow::datatypes::{DataType as ArrowType, Schema};
use serde::{Deserialize, Serialize};
use shamal_tensor::DataType;

use crate::error::{Error, Result};
use crate::format::Format;

/// A model input as its metadata describes it: the v2 datatype (`"FP32"`,
/// `"INT64"`, `"BYTES"`, ...) and the shape, with `-1` as the batch (first)
/// dimension, e.g. `[-1, 4]`; and the dataset column it is read from when
/// that is not named like the input (a job's `input_columns`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelInput {
    pub name: String,
    pub datatype: String,
    pub shape: Vec<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub column: Option<String>,
}

/// What a row holds for an input, from its datatype and shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputKind {
    /// One number per row: shape `[-1]` or `[-1, 1]`.
    Scalar,
    /// A fixed number of numbers per row (the product of the non-batch
    /// dimensions), e.g. 4 for `[-1, 4]`, 6 for `[-1, 2, 3]`.
    Vector(usize),
    /// One string per row: a BYTES input of shape `[-1]` or `[-1, 1]`.
    Text,
}

impl ModelInput {
    pub fn new(name: impl Into<String>, datatype: impl Into<String>, shape: Vec<i64>) -> Self {
        ModelInput {
            name: name.into(),
            datatype: datatype.into(),
            shape,
            column: None,
        }
    }

    /// The input, read from dataset column `column`.
    pub fn with_column(mut self, column: impl Into<String>) -> Self {
        let column = column.into();
        self.column = (column != self.name).then_some(column);
        self
    }

    /// The dataset column the input is read from.
    pub fn column(&self) -> &str {
        self.column.as_deref().unwrap_or(&self.name)
    }

    /// The input's datatype and what a row holds for it. Refuses, with
    /// [`Error::UnsupportedInput`], inputs without a batch dimension, with a
    /// variable (`-1`) or zero dimension past the batch one, and BYTES
    /// inputs of more than one string per row.
    pub fn kind(&self) -> Result<(DataType, InputKind)> {
        let unsupported = |reason: String| Error::UnsupportedInput {
            input: self.name.clone(),
            reason,
        };
        let datatype = DataType::parse(&self.datatype)
            .ok_or_else(|| unsupported(format!("unknown datatype '{}'", self.datatype)))?;
        if self.shape.first() != Some(&-1) {
            return Err(unsupported(format!(
                "shape {:?} has no batch dimension: batch inference needs -1 first",
                self.shape
            )));
        }
        let rest = &self.shape[1..];
        let mut elements: usize = 1;
        for &dim in rest {
            let dim = usize::try_from(dim)
                .ok()
                .filter(|&dim| dim > 0)
                .ok_or_else(|| {
                    unsupported(format!(
                        "shape {:?}: only the first dimension may be variable, and none may be 0",
                        self.shape
                    ))
                })?;
            elements = elements
                .checked_mul(dim)
                .ok_or_else(|| unsupported(format!("shape {:?} is too large", self.shape)))?;
        }
        let scalar = rest.len() <= 1 && elements == 1;
        let kind = match (datatype, scalar) {
            (DataType::Bytes, true) => InputKind::Text,
            (DataType::Bytes, false) => {
                return Err(unsupported(format!(
                    "BYTES shape {:?}: only one string per row is supported",
                    self.shape
                )));
            }
            (_, true) => InputKind::Scalar,
            (_, false) => InputKind::Vector(elements),
        };
        Ok((datatype, kind))
    }

    /// What the column for this input must be, in words.
    pub(crate) fn expected(&self, format: Format) -> String {
        let Ok((datatype, kind)) = self.kind() else {
            return format!("a column for input '{}'", self.name);
        };
        match kind {
            InputKind::Text => format!("a string column for BYTES input '{}'", self.name),
            InputKind::Scalar => format!(
                "{} column for {datatype} input '{}'",
                numbers_of(datatype),
                self.name
            ),
            InputKind::Vector(length) => {
                let base = format!(
                    "a list of {datatype} of length {length} for input '{}'",
                    self.name
                );
                if format == Format::Csv {
                    format!("{base} (in CSV, a string like \"[1, 2, ...]\")")
                } else {
                    base
                }
            }
        }
    }
}

fn numbers_of(datatype: DataType) -> &'static str {
    match datatype {
        DataType::Bool => "a boolean",
        DataType::Fp16 | DataType::Bf16 | DataType::Fp32 | DataType::Fp64 => "a numeric",
        _ => "an integer",
    }
}

/// Whether values of `found` can be read as `datatype` elements: booleans
/// for BOOL; integers for integer datatypes (each value range-checked when
/// read); integers or floats for floating-point datatypes.
pub(crate) fn numeric_compatible(datatype: DataType, found: &ArrowType) -> bool {
    match datatype {
        DataType::Bool => matches!(found, ArrowType::Boolean),
        DataType::Fp16 | DataType::Bf16 | DataType::Fp32 | DataType::Fp64 => {
            found.is_integer() || found.is_floating()
        }
        DataType::Bytes => false,
        _ => found.is_integer(),
    }
}

pub(crate) fn is_text(found: &ArrowType) -> bool {
    matches!(
        found,
        ArrowType::Utf8
            | ArrowType::LargeUtf8
            | ArrowType::Utf8View
            | ArrowType::Binary
            | ArrowType::LargeBinary
            | ArrowType::BinaryView
    )
}

/// Whether a column of type `found` can feed `input`.
fn compatible(datatype: DataType, kind: InputKind, format: Format, found: &ArrowType) -> bool {
    match kind {
        InputKind::Text => is_text(found),
        InputKind::Scalar => numeric_compatible(datatype, found),
        InputKind::Vector(length) => match found {
            ArrowType::List(item) | ArrowType::LargeList(item) => {
                numeric_compatible(datatype, item.data_type())
            }
            ArrowType::FixedSizeList(item, size) => {
                usize::try_from(*size).ok() == Some(length)
                    && numeric_compatible(datatype, item.data_type())
            }
            ArrowType::Utf8 | ArrowType::LargeUtf8 | ArrowType::Utf8View => format == Format::Csv,
            _ => false,
        },
    }
}

/// Checks one file's schema; see [`crate::Dataset::check`].
pub(crate) fn check_schema(
    schema: &Schema,
    format: Format,
    file: &str,
    inputs: &[ModelInput],
    keys: &[String],
) -> Result<()> {
    let missing = |column: &str, needed_for: String| Error::MissingColumn {
        column: column.to_owned(),
        needed_for,
        file: file.to_owned(),
        available: schema
            .fields()
            .iter()
            .map(|field| field.name().clone())
            .collect(),
    };
    for input in inputs {
        let (datatype, kind) = input.kind()?;
        let column = input.column();
        let field = schema
            .field_with_name(column)
            .map_err(|_| missing(column, format!("input '{}'", input.name)))?;
        if !compatible(datatype, kind, format, field.data_type()) {
            return Err(Error::WrongType {
                column: column.to_owned(),
                expected: input.expected(format),
                found: field.data_type().to_string(),
            });
        }
    }
    for key in keys {
        if schema.field_with_name(key).is_err() {
            return Err(missing(key, "key column".to_owned()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mapped_input_is_looked_for_in_its_column_and_named_as_the_input() {
        let schema = Schema::new(vec![
            arrow::datatypes::Field::new("id", ArrowType::Int64, false),
            arrow::datatypes::Field::new("sentence", ArrowType::Int64, false),
        ]);
        let text = ModelInput::new("text", "BYTES", vec![-1]);
        let error = check_schema(
            &schema,
            Format::Parquet,
            "f.parquet",
            &[text.clone().with_column("sentence")],
            &[],
        )
        .expect_err("an integer column for a text input");
        assert_eq!(
            error.to_string(),
            "column 'sentence': expected a string column for BYTES input 'text', found Int64"
        );
        let error = check_schema(
            &schema,
            Format::Parquet,
            "f.parquet",
            &[text.clone().with_column("body")],
            &[],
        )
        .expect_err("no such column");
        match error {
            Error::MissingColumn {
                column, needed_for, ..
            } => {
                assert_eq!(column, "body");
                assert_eq!(needed_for, "input 'text'");
            }
            other => panic!("expected a missing column, got {other:?}"),
        }
        assert_eq!(text.clone().with_column("text").column, None);
        assert_eq!(text.with_column("sentence").column(), "sentence");
    }

    #[test]
    fn kinds_follow_datatype_and_shape() {
        let kind = |datatype: &str, shape: Vec<i64>| ModelInput::new("x", datatype, shape).kind();
        assert_eq!(
            kind("FP32", vec![-1]).ok(),
            Some((DataType::Fp32, InputKind::Scalar))
        );
        assert_eq!(
            kind("INT64", vec![-1, 1]).ok(),
            Some((DataType::Int64, InputKind::Scalar))
        );
        assert_eq!(
            kind("FP32", vec![-1, 4]).ok(),
            Some((DataType::Fp32, InputKind::Vector(4)))
        );
        assert_eq!(
            kind("FP64", vec![-1, 2, 3]).ok(),
            Some((DataType::Fp64, InputKind::Vector(6)))
        );
        assert_eq!(
            kind("BYTES", vec![-1, 1]).ok(),
            Some((DataType::Bytes, InputKind::Text))
        );
        for (datatype, shape) in [
            ("FP32", vec![4]),
            ("FP32", vec![-1, -1]),
            ("FP32", vec![-1, 0]),
            ("BYTES", vec![-1, 2]),
            ("FLOAT", vec![-1]),
            ("FP32", vec![]),
        ] {
            assert!(
                matches!(
                    kind(datatype, shape.clone()),
                    Err(Error::UnsupportedInput { .. })
                ),
                "{datatype} {shape:?}"
            );
        }
    }
}
