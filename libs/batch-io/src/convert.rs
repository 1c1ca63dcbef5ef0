//! Arrow columns to KServe v2 tensors and back.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, ArrowPrimitiveType, AsArray, BinaryArray, BooleanArray, FixedSizeListArray,
    Float64Array, Int64Array, LargeBinaryArray, PrimitiveArray, UInt64Array,
};
use arrow::buffer::ScalarBuffer;
use arrow::compute::{CastOptions, cast, cast_with_options};
use arrow::datatypes::{
    DataType as ArrowType, Field, Float16Type, Float32Type, Float64Type, Int8Type, Int16Type,
    Int32Type, Int64Type, UInt8Type, UInt16Type, UInt32Type, UInt64Type,
};
use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use shamal_proto::inference::{ModelInferRequest, ModelInferResponse};
use shamal_tensor::{DataType, Tensor, TensorData};

use crate::error::{Error, Result};
use crate::schema::{InputKind, ModelInput, is_text, numeric_compatible};

/// Where a batch's rows come from: errors name row `first_row + i` of
/// `location` for the batch's row `i`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowOrigin {
    /// In words: `file '/d/a.parquet'` or `shard 3 ('/d/a.csv' bytes 0..99)`.
    pub location: String,
    /// The number, within `location`, of the batch's first row (from 0).
    pub first_row: u64,
}

struct Column<'a> {
    name: &'a str,
    origin: &'a RowOrigin,
}

impl Column<'_> {
    fn bad_row(&self, row: usize, reason: impl Into<String>) -> Error {
        Error::BadRow {
            column: self.name.to_owned(),
            row: self.origin.first_row + row as u64,
            location: self.origin.location.clone(),
            reason: reason.into(),
        }
    }

    fn wrong_type(&self, input: &ModelInput, found: &ArrowType) -> Error {
        Error::WrongType {
            column: self.name.to_owned(),
            expected: input.expected(crate::Format::Parquet),
            found: found.to_string(),
        }
    }
}

/// The Arrow type an element of `datatype` is converted to before its
/// bytes are taken (BF16 goes through FP32).
fn arrow_type(datatype: DataType) -> ArrowType {
    match datatype {
        DataType::Bool => ArrowType::Boolean,
        DataType::Uint8 => ArrowType::UInt8,
        DataType::Uint16 => ArrowType::UInt16,
        DataType::Uint32 => ArrowType::UInt32,
        DataType::Uint64 => ArrowType::UInt64,
        DataType::Int8 => ArrowType::Int8,
        DataType::Int16 => ArrowType::Int16,
        DataType::Int32 => ArrowType::Int32,
        DataType::Int64 => ArrowType::Int64,
        DataType::Fp16 => ArrowType::Float16,
        DataType::Bf16 | DataType::Fp32 => ArrowType::Float32,
        DataType::Fp64 => ArrowType::Float64,
        DataType::Bytes => ArrowType::LargeBinary,
    }
}

/// Little-endian bytes of every value of `values` (no nulls left), which is
/// already of [`arrow_type`]`(datatype)`.
///
/// On a little-endian machine the Arrow buffer of a type the tensor keeps
/// (all but BOOL and BF16) already holds those bytes: it is shared, not
/// copied.
fn little_endian(values: &dyn Array, datatype: DataType) -> Bytes {
    fn primitive<T: ArrowPrimitiveType, const N: usize>(
        values: &dyn Array,
        to_bytes: impl Fn(T::Native) -> [u8; N],
    ) -> Bytes {
        let values = values.as_primitive::<T>().values();
        if cfg!(target_endian = "little") && std::mem::size_of::<T::Native>() == N {
            return Bytes::from_owner(values.inner().clone());
        }
        let mut bytes = Vec::with_capacity(values.len() * N);
        for &value in values.iter() {
            bytes.extend_from_slice(&to_bytes(value));
        }
        Bytes::from(bytes)
    }
    match datatype {
        DataType::Bool => values
            .as_boolean()
            .values()
            .iter()
            .map(u8::from)
            .collect::<Vec<u8>>()
            .into(),
        DataType::Uint8 => primitive::<UInt8Type, 1>(values, u8::to_le_bytes),
        DataType::Uint16 => primitive::<UInt16Type, 2>(values, u16::to_le_bytes),
        DataType::Uint32 => primitive::<UInt32Type, 4>(values, u32::to_le_bytes),
        DataType::Uint64 => primitive::<UInt64Type, 8>(values, u64::to_le_bytes),
        DataType::Int8 => primitive::<Int8Type, 1>(values, i8::to_le_bytes),
        DataType::Int16 => primitive::<Int16Type, 2>(values, i16::to_le_bytes),
        DataType::Int32 => primitive::<Int32Type, 4>(values, i32::to_le_bytes),
        DataType::Int64 => primitive::<Int64Type, 8>(values, i64::to_le_bytes),
        DataType::Fp16 => primitive::<Float16Type, 2>(values, half::f16::to_le_bytes),
        DataType::Bf16 => {
            primitive::<Float32Type, 2>(values, |v| half::bf16::from_f32(v).to_le_bytes())
        }
        DataType::Fp32 => primitive::<Float32Type, 4>(values, f32::to_le_bytes),
        DataType::Fp64 => primitive::<Float64Type, 8>(values, f64::to_le_bytes),
        DataType::Bytes => Bytes::new(),
    }
}

/// The index of the first null of `values`, if any.
fn first_null(values: &dyn Array) -> Option<usize> {
    let nulls = values.logical_nulls()?;
    if nulls.null_count() == 0 {
        return None;
    }
    nulls.iter().position(|valid| !valid)
}

/// Converts numbers (`values`, `per_row` of them per row) to `datatype`'s
/// Arrow type, failing on the first null or out-of-range value.
fn convert_numbers(
    column: &Column<'_>,
    values: &dyn Array,
    datatype: DataType,
    per_row: usize,
) -> Result<ArrayRef> {
    if let Some(index) = first_null(values) {
        return Err(column.bad_row(index / per_row, "null value"));
    }
    let target = arrow_type(datatype);
    // Safe casting turns values that do not fit into nulls.
    let converted =
        cast_with_options(values, &target, &CastOptions::default()).map_err(|error| {
            Error::WrongType {
                column: column.name.to_owned(),
                expected: format!("values convertible to {datatype}"),
                found: format!("{} ({error})", values.data_type()),
            }
        })?;
    if let Some(index) = first_null(converted.as_ref()) {
        return Err(column.bad_row(index / per_row, format!("value does not fit in {datatype}")));
    }
    Ok(converted)
}

/// The flattened values of a list column whose rows all hold `length`
/// elements.
fn list_values(column: &Column<'_>, array: &dyn Array, length: usize) -> Result<ArrayRef> {
    if let Some(row) = first_null(array) {
        return Err(column.bad_row(row, "null list"));
    }
    let check = |row: usize, found: usize| -> Result<()> {
        if found != length {
            return Err(column.bad_row(row, format!("expected {length} values, found {found}")));
        }
        Ok(())
    };
    match array.data_type() {
        ArrowType::List(_) => {
            let list = array.as_list::<i32>();
            let offsets = list.value_offsets();
            for row in 0..list.len() {
                check(row, (offsets[row + 1] - offsets[row]) as usize)?;
            }
            let start = offsets[0] as usize;
            Ok(list
                .values()
                .slice(start, offsets[list.len()] as usize - start))
        }
        ArrowType::LargeList(_) => {
            let list = array.as_list::<i64>();
            let offsets = list.value_offsets();
            for row in 0..list.len() {
                check(row, (offsets[row + 1] - offsets[row]) as usize)?;
            }
            let start = offsets[0] as usize;
            Ok(list
                .values()
                .slice(start, offsets[list.len()] as usize - start))
        }
        ArrowType::FixedSizeList(_, size) => {
            let list = array.as_fixed_size_list();
            if list.len() > 0 {
                check(0, *size as usize)?;
            }
            // Slicing a FixedSizeListArray slices its values too.
            Ok(list.values().slice(0, list.len() * length))
        }
        other => Err(Error::WrongType {
            column: column.name.to_owned(),
            expected: format!("a list of length {length}"),
            found: other.to_string(),
        }),
    }
}

/// Parses a CSV vector cell, a JSON array of numbers (`"[1, 2.5, 3]"`),
/// into flattened values for `datatype`.
fn parse_vectors(
    column: &Column<'_>,
    array: &dyn Array,
    datatype: DataType,
    length: usize,
) -> Result<ArrayRef> {
    let strings = cast(array, &ArrowType::LargeUtf8).map_err(|error| Error::WrongType {
        column: column.name.to_owned(),
        expected: "a string column".to_owned(),
        found: format!("{} ({error})", array.data_type()),
    })?;
    let strings = strings.as_string::<i64>();
    let floating = matches!(
        datatype,
        DataType::Fp16 | DataType::Bf16 | DataType::Fp32 | DataType::Fp64
    );
    let mut floats: Vec<f64> = Vec::new();
    let mut signed: Vec<i64> = Vec::new();
    let mut unsigned: Vec<u64> = Vec::new();
    for row in 0..strings.len() {
        if strings.is_null(row) {
            return Err(column.bad_row(row, "null value"));
        }
        let text = strings.value(row);
        let numbers: Vec<serde_json::Number> = serde_json::from_str(text).map_err(|error| {
            column.bad_row(
                row,
                format!(
                    "expected a JSON array of numbers like \"[1, 2]\", found {text:?} ({error})"
                ),
            )
        })?;
        if numbers.len() != length {
            return Err(column.bad_row(
                row,
                format!("expected {length} values, found {}", numbers.len()),
            ));
        }
        for number in numbers {
            let bad = || column.bad_row(row, format!("value {number} does not fit in {datatype}"));
            if floating {
                floats.push(number.as_f64().ok_or_else(bad)?);
            } else if datatype == DataType::Uint64 {
                unsigned.push(number.as_u64().ok_or_else(bad)?);
            } else if datatype == DataType::Bool {
                return Err(column.bad_row(row, "BOOL vectors cannot be read from CSV"));
            } else {
                signed.push(number.as_i64().ok_or_else(bad)?);
            }
        }
    }
    let parsed: ArrayRef = if floating {
        Arc::new(Float64Array::from(floats))
    } else if datatype == DataType::Uint64 {
        Arc::new(UInt64Array::from(unsigned))
    } else {
        Arc::new(Int64Array::from(signed))
    };
    convert_numbers(column, parsed.as_ref(), datatype, length)
}

fn input_tensor(batch: &RecordBatch, input: &ModelInput, origin: &RowOrigin) -> Result<Tensor> {
    let (datatype, kind) = input.kind()?;
    let column = Column {
        name: &input.name,
        origin,
    };
    let array = batch
        .column_by_name(&input.name)
        .ok_or_else(|| Error::MissingColumn {
            column: input.name.clone(),
            needed_for: format!("input '{}'", input.name),
            file: origin.location.clone(),
            available: batch
                .schema()
                .fields()
                .iter()
                .map(|field| field.name().clone())
                .collect(),
        })?;
    let rows = batch.num_rows();
    let found = array.data_type();
    let mut shape = vec![rows as i64];
    let data = match kind {
        InputKind::Text => {
            if !is_text(found) {
                return Err(column.wrong_type(input, found));
            }
            let binary =
                cast(array, &ArrowType::LargeBinary).map_err(|error| Error::WrongType {
                    column: input.name.clone(),
                    expected: input.expected(crate::Format::Parquet),
                    found: format!("{found} ({error})"),
                })?;
            let binary: &LargeBinaryArray = binary.as_binary::<i64>();
            let mut items = Vec::with_capacity(rows);
            for row in 0..rows {
                if binary.is_null(row) {
                    return Err(column.bad_row(row, "null value"));
                }
                items.push(Bytes::copy_from_slice(binary.value(row)));
            }
            shape.extend_from_slice(&input.shape[1..]);
            TensorData::Strings(items)
        }
        InputKind::Scalar => {
            if !numeric_compatible(datatype, found) {
                return Err(column.wrong_type(input, found));
            }
            let values = convert_numbers(&column, array.as_ref(), datatype, 1)?;
            shape.extend_from_slice(&input.shape[1..]);
            TensorData::Fixed(little_endian(values.as_ref(), datatype))
        }
        InputKind::Vector(length) => {
            let values = match found {
                ArrowType::Utf8 | ArrowType::LargeUtf8 | ArrowType::Utf8View => {
                    parse_vectors(&column, array.as_ref(), datatype, length)?
                }
                ArrowType::List(item)
                | ArrowType::LargeList(item)
                | ArrowType::FixedSizeList(item, _)
                    if numeric_compatible(datatype, item.data_type()) =>
                {
                    let flat = list_values(&column, array.as_ref(), length)?;
                    convert_numbers(&column, flat.as_ref(), datatype, length)?
                }
                _ => return Err(column.wrong_type(input, found)),
            };
            shape.extend_from_slice(&input.shape[1..]);
            TensorData::Fixed(little_endian(values.as_ref(), datatype))
        }
    };
    let tensor = Tensor {
        name: input.name.clone(),
        datatype,
        shape,
        data,
    };
    Ok(tensor)
}

/// The input tensors for `batch`'s rows, in `inputs`' order, as
/// [`to_infer_request`] encodes them: for a caller that runs the model in
/// process and needs no request (a batch worker), saving the request's
/// encoding and decoding. Same rules and errors as [`to_infer_request`].
pub fn input_tensors(
    batch: &RecordBatch,
    inputs: &[ModelInput],
    origin: &RowOrigin,
) -> Result<Vec<Tensor>> {
    inputs
        .iter()
        .map(|input| input_tensor(batch, input, origin))
        .collect()
}

/// The `ModelInferRequest` for `batch`'s rows: one input tensor per model
/// input, read from the column named like it, shape `[rows, ...]` (the
/// input's own shape with the batch dimension set), data in
/// `raw_input_contents` (little-endian; BYTES elements each prefixed with
/// their 4-byte little-endian length, as Triton sends them). The caller
/// sets `model_name`, `model_version` and `id`.
///
/// Per row: a null, a vector of the wrong length, an integer that does not
/// fit the input's datatype or a CSV vector that is not a JSON array of
/// numbers fails with [`Error::BadRow`], the row numbered from `origin`.
pub fn to_infer_request(
    batch: &RecordBatch,
    inputs: &[ModelInput],
    origin: &RowOrigin,
) -> Result<ModelInferRequest> {
    let tensors = input_tensors(batch, inputs, origin)?;
    let (inputs, raw) = shamal_tensor::encode_inputs(&tensors);
    Ok(ModelInferRequest {
        inputs,
        raw_input_contents: raw,
        ..Default::default()
    })
}

/// The Arrow type of an output column's elements for `datatype`: BF16 is
/// widened to Float32 (Arrow has no bfloat16); BYTES is Binary.
fn output_type(datatype: DataType) -> ArrowType {
    match datatype {
        DataType::Bytes => ArrowType::Binary,
        other => arrow_type(other),
    }
}

fn values_array(tensor: &Tensor) -> ArrayRef {
    /// On a little-endian machine, bytes of the element type that are
    /// aligned for it become the array's buffer as they are (shared);
    /// others are copied.
    fn primitive<T: ArrowPrimitiveType, const N: usize>(
        bytes: &Bytes,
        from: impl Fn([u8; N]) -> T::Native,
    ) -> ArrayRef {
        if cfg!(target_endian = "little")
            && std::mem::size_of::<T::Native>() == N
            && bytes
                .as_ptr()
                .align_offset(std::mem::align_of::<T::Native>())
                == 0
        {
            let values = ScalarBuffer::<T::Native>::new(
                arrow::buffer::Buffer::from(bytes.clone()),
                0,
                bytes.len() / N,
            );
            return Arc::new(PrimitiveArray::<T>::new(values, None));
        }
        let values: Vec<T::Native> = bytes
            .chunks_exact(N)
            .map(|chunk| {
                let mut array = [0u8; N];
                array.copy_from_slice(chunk);
                from(array)
            })
            .collect();
        Arc::new(PrimitiveArray::<T>::from_iter_values(values))
    }
    match &tensor.data {
        TensorData::Strings(items) => Arc::new(BinaryArray::from_iter_values(items.iter())),
        TensorData::Fixed(bytes) => match tensor.datatype {
            DataType::Bool => Arc::new(BooleanArray::from(
                bytes.iter().map(|&byte| byte != 0).collect::<Vec<_>>(),
            )),
            DataType::Uint8 => primitive::<UInt8Type, 1>(bytes, u8::from_le_bytes),
            DataType::Uint16 => primitive::<UInt16Type, 2>(bytes, u16::from_le_bytes),
            DataType::Uint32 => primitive::<UInt32Type, 4>(bytes, u32::from_le_bytes),
            DataType::Uint64 => primitive::<UInt64Type, 8>(bytes, u64::from_le_bytes),
            DataType::Int8 => primitive::<Int8Type, 1>(bytes, i8::from_le_bytes),
            DataType::Int16 => primitive::<Int16Type, 2>(bytes, i16::from_le_bytes),
            DataType::Int32 => primitive::<Int32Type, 4>(bytes, i32::from_le_bytes),
            DataType::Int64 => primitive::<Int64Type, 8>(bytes, i64::from_le_bytes),
            DataType::Fp16 => primitive::<Float16Type, 2>(bytes, half::f16::from_le_bytes),
            DataType::Bf16 => {
                primitive::<Float32Type, 2>(bytes, |b| half::bf16::from_le_bytes(b).to_f32())
            }
            DataType::Fp32 => primitive::<Float32Type, 4>(bytes, f32::from_le_bytes),
            DataType::Fp64 => primitive::<Float64Type, 8>(bytes, f64::from_le_bytes),
            // BYTES tensors hold Strings, never Fixed.
            DataType::Bytes => Arc::new(BinaryArray::from_iter_values(std::iter::empty::<&[u8]>())),
        },
    }
}

/// The outputs of `response` (raw or typed contents) as Arrow columns, in
/// the response's order, for a request of `rows` rows: an output of shape
/// `[rows]` or `[rows, 1]` becomes a column of its elements, one of shape
/// `[rows, d1, ...]` a FixedSizeList column of `d1 * ...` elements per row.
/// Element types: BOOL → Boolean, INTn / UINTn → Int / UInt of that
/// width, FP16 → Float16, BF16 → Float32, FP32 → Float32, FP64 → Float64,
/// BYTES → Binary. A response that does not decode, or whose first
/// dimension is not `rows`, fails with [`Error::BadOutput`].
pub fn outputs_to_columns(
    response: ModelInferResponse,
    rows: usize,
) -> Result<Vec<(String, ArrayRef)>> {
    let raw = response.raw_output_contents;
    let tensors =
        shamal_tensor::decode_outputs(response.outputs, raw).map_err(|error| Error::BadOutput {
            // The codec's message names the tensor at fault.
            output: "response".to_owned(),
            reason: error.to_string(),
        })?;
    tensors_to_columns(&tensors, rows)
}

/// Output tensors (a model's answer for `rows` rows, in process) as Arrow
/// columns, by the rules of [`outputs_to_columns`]. A tensor whose data
/// does not agree with its shape, or whose first dimension is not `rows`,
/// fails with [`Error::BadOutput`].
pub fn tensors_to_columns(tensors: &[Tensor], rows: usize) -> Result<Vec<(String, ArrayRef)>> {
    let mut columns = Vec::with_capacity(tensors.len());
    for tensor in tensors {
        let bad = |reason: String| Error::BadOutput {
            output: tensor.name.clone(),
            reason,
        };
        if tensor.shape.first().copied() != Some(rows as i64) {
            return Err(bad(format!(
                "shape {:?} does not start with the batch's {rows} rows",
                tensor.shape
            )));
        }
        let elements = shamal_tensor::element_count(&tensor.name, &tensor.shape)
            .map_err(|error| bad(error.to_string()))?;
        let held = match (&tensor.data, tensor.datatype.element_size()) {
            (TensorData::Fixed(bytes), Some(size)) => {
                (bytes.len() % size == 0).then_some(bytes.len() / size)
            }
            (TensorData::Strings(items), None) => Some(items.len()),
            _ => None,
        };
        if held != Some(elements) {
            return Err(bad(format!(
                "its {} data does not hold the {elements} elements of shape {:?}",
                tensor.datatype, tensor.shape
            )));
        }
        let values = values_array(tensor);
        let per_row = shamal_tensor::element_count(&tensor.name, &tensor.shape[1..])
            .map_err(|error| bad(error.to_string()))?;
        let column: ArrayRef =
            if tensor.shape.len() == 1 || (tensor.shape.len() == 2 && tensor.shape[1] == 1) {
                values
            } else {
                let size = i32::try_from(per_row)
                    .map_err(|_| bad(format!("{per_row} elements per row is too many")))?;
                let item = Arc::new(Field::new("item", output_type(tensor.datatype), false));
                Arc::new(
                    FixedSizeListArray::try_new(item, size, values, None)
                        .map_err(|error| bad(error.to_string()))?,
                )
            };
        columns.push((tensor.name.clone(), column));
    }
    Ok(columns)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{BooleanArray, Int32Array, StringArray};
    use shamal_proto::inference::InferTensorContents;
    use shamal_proto::inference::model_infer_response::InferOutputTensor;

    fn origin() -> RowOrigin {
        RowOrigin {
            location: "test".to_owned(),
            first_row: 100,
        }
    }

    #[test]
    fn scalar_and_text_inputs_become_raw_little_endian_tensors() {
        let batch = RecordBatch::try_from_iter([
            (
                "n",
                Arc::new(Int32Array::from(vec![1, -2, 300])) as ArrayRef,
            ),
            (
                "s",
                Arc::new(StringArray::from(vec!["a", "", "héllo"])) as ArrayRef,
            ),
            (
                "b",
                Arc::new(BooleanArray::from(vec![true, false, true])) as ArrayRef,
            ),
        ])
        .expect("batch");
        let inputs = [
            ModelInput::new("n", "INT64", vec![-1]),
            ModelInput::new("n", "FP16", vec![-1, 1]),
            ModelInput::new("s", "BYTES", vec![-1]),
            ModelInput::new("b", "BOOL", vec![-1]),
        ];
        let request = to_infer_request(&batch, &inputs, &origin()).expect("request");
        assert_eq!(request.inputs[0].shape, vec![3]);
        assert_eq!(request.inputs[1].shape, vec![3, 1]);
        assert_eq!(request.inputs[0].datatype, "INT64");
        let raw = &request.raw_input_contents;
        let expected: Vec<u8> = [1i64, -2, 300]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(raw[0].as_ref(), expected.as_slice());
        let expected: Vec<u8> = [1.0f32, -2.0, 300.0]
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        assert_eq!(raw[1].as_ref(), expected.as_slice());
        let mut strings = Vec::new();
        for text in ["a", "", "héllo"] {
            strings.extend_from_slice(&(text.len() as u32).to_le_bytes());
            strings.extend_from_slice(text.as_bytes());
        }
        assert_eq!(raw[2].as_ref(), strings.as_slice());
        assert_eq!(raw[3].as_ref(), &[1, 0, 1]);

        let error = to_infer_request(
            &batch,
            &[ModelInput::new("n", "UINT8", vec![-1])],
            &origin(),
        )
        .expect_err("-2 in UINT8");
        assert!(
            matches!(&error, Error::BadRow { row: 101, column, .. } if column == "n"),
            "{error:?}"
        );
    }

    #[test]
    fn outputs_become_primitive_or_fixed_size_list_columns() {
        let output = |name: &str, datatype: &str, shape: Vec<i64>| InferOutputTensor {
            name: name.to_owned(),
            datatype: datatype.to_owned(),
            shape,
            ..Default::default()
        };
        let response = ModelInferResponse {
            outputs: vec![
                output("label", "BYTES", vec![2, 1]),
                output("probs", "FP64", vec![2, 3]),
                output("flag", "BOOL", vec![2]),
                output("half", "BF16", vec![2]),
            ],
            raw_output_contents: vec![
                Bytes::from_static(b"\x03\0\0\0cat\x03\0\0\0dog"),
                Bytes::from(
                    [0.1f64, 0.2, 0.7, 0.5, 0.25, 0.25]
                        .iter()
                        .flat_map(|v| v.to_le_bytes())
                        .collect::<Vec<u8>>(),
                ),
                Bytes::from_static(&[1, 0]),
                Bytes::from(
                    [1.5f32, -2.0]
                        .iter()
                        .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                        .collect::<Vec<u8>>(),
                ),
            ],
            ..Default::default()
        };
        let columns = outputs_to_columns(response, 2).expect("columns");
        let names: Vec<&str> = columns.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(names, ["label", "probs", "flag", "half"]);
        let label = columns[0].1.as_binary::<i32>();
        assert_eq!(label.value(1), b"dog");
        let probs = columns[1].1.as_fixed_size_list();
        assert_eq!(probs.value_length(), 3);
        assert_eq!(
            probs
                .value(1)
                .as_primitive::<Float64Type>()
                .values()
                .to_vec(),
            vec![0.5, 0.25, 0.25]
        );
        assert!(!columns[2].1.as_boolean().value(1));
        assert_eq!(
            columns[3].1.as_primitive::<Float32Type>().values().to_vec(),
            vec![1.5, -2.0]
        );

        // Typed contents decode too.
        let response = ModelInferResponse {
            outputs: vec![InferOutputTensor {
                contents: Some(InferTensorContents {
                    int_contents: vec![7, 8],
                    ..Default::default()
                }),
                ..output("n", "INT32", vec![2])
            }],
            ..Default::default()
        };
        let columns = outputs_to_columns(response, 2).expect("typed");
        assert_eq!(
            columns[0].1.as_primitive::<Int32Type>().values().to_vec(),
            vec![7, 8]
        );

        // A batch dimension that is not the request's rows, and bytes that
        // do not match the shape.
        let response = ModelInferResponse {
            outputs: vec![output("flag", "BOOL", vec![3])],
            raw_output_contents: vec![Bytes::from_static(&[1, 0, 1])],
            ..Default::default()
        };
        let error = outputs_to_columns(response, 2).expect_err("3 rows for 2");
        assert!(matches!(&error, Error::BadOutput { output, .. } if output == "flag"));
        let response = ModelInferResponse {
            outputs: vec![output("flag", "BOOL", vec![2])],
            raw_output_contents: vec![Bytes::from_static(&[1])],
            ..Default::default()
        };
        let error = outputs_to_columns(response, 2).expect_err("short");
        assert!(error.to_string().contains("flag"), "{error}");
    }

    #[test]
    fn in_process_tensors_convert_as_the_request_and_response_do() {
        let batch = RecordBatch::try_from_iter([
            (
                "n",
                Arc::new(Int32Array::from(vec![1, -2, 300])) as ArrayRef,
            ),
            (
                "s",
                Arc::new(StringArray::from(vec!["a", "", "héllo"])) as ArrayRef,
            ),
        ])
        .expect("batch");
        let inputs = [
            ModelInput::new("n", "INT64", vec![-1]),
            ModelInput::new("s", "BYTES", vec![-1]),
        ];
        let tensors = input_tensors(&batch, &inputs, &origin()).expect("tensors");
        let request = to_infer_request(&batch, &inputs, &origin()).expect("request");
        let decoded = shamal_tensor::decode_inputs(request.inputs, request.raw_input_contents)
            .expect("decodes");
        assert_eq!(tensors, decoded);

        // A slice of a batch (a worker scores a chunk's rows a slice at a
        // time) converts as a batch of just those rows, vectors included.
        let vectors = FixedSizeListArray::try_new(
            Arc::new(Field::new("item", ArrowType::Float32, false)),
            2,
            Arc::new(arrow::array::Float32Array::from(vec![
                1.0, 2.0, 3.0, 4.0, 5.0, 6.0,
            ])),
            None,
        )
        .expect("vectors");
        let whole =
            RecordBatch::try_from_iter([("v", Arc::new(vectors) as ArrayRef)]).expect("batch");
        let vector_input = [ModelInput::new("v", "FP32", vec![-1, 2])];
        let sliced = input_tensors(&whole.slice(1, 2), &vector_input, &origin()).expect("slice");
        let rest = FixedSizeListArray::try_new(
            Arc::new(Field::new("item", ArrowType::Float32, false)),
            2,
            Arc::new(arrow::array::Float32Array::from(vec![3.0, 4.0, 5.0, 6.0])),
            None,
        )
        .expect("vectors");
        let alone = RecordBatch::try_from_iter([("v", Arc::new(rest) as ArrayRef)]).expect("batch");
        assert_eq!(
            sliced,
            input_tensors(&alone, &vector_input, &origin()).expect("rows 1..3")
        );
        assert_eq!(sliced[0].shape, vec![2, 2]);
        let sliced = input_tensors(&batch.slice(1, 2), &inputs, &origin()).expect("slice");
        assert_eq!(
            sliced[0].data,
            TensorData::Fixed(Bytes::from(
                [-2i64, 300]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect::<Vec<u8>>(),
            ))
        );
        assert_eq!(
            sliced[1].data,
            TensorData::Strings(vec![Bytes::new(), Bytes::from("héllo")])
        );

        // The model's answer, as tensors and through a response.
        let answer = vec![
            Tensor::from_raw(
                "probs",
                DataType::Fp32,
                vec![3, 2],
                Bytes::from(
                    [0.5f32, 0.5, 0.25, 0.75, 1.0, 0.0]
                        .iter()
                        .flat_map(|v| v.to_le_bytes())
                        .collect::<Vec<u8>>(),
                ),
            )
            .expect("probs"),
            Tensor::from_raw(
                "label",
                DataType::Bytes,
                vec![3],
                Bytes::from_static(b"\x01\0\0\0a\x01\0\0\0b\x01\0\0\0c"),
            )
            .expect("label"),
        ];
        let direct = tensors_to_columns(&answer, 3).expect("columns");
        let (outputs, raw_output_contents) = shamal_tensor::encode_outputs(&answer);
        let through = outputs_to_columns(
            ModelInferResponse {
                outputs,
                raw_output_contents,
                ..Default::default()
            },
            3,
        )
        .expect("columns");
        assert_eq!(direct, through);
        assert_eq!(direct[0].1.as_fixed_size_list().value_length(), 2);
        assert_eq!(direct[1].1.as_binary::<i32>().value(2), b"c");

        // A tensor built by hand whose data disagrees with its shape (the
        // codec never makes one; a backend could) is refused, naming it.
        let short = Tensor {
            name: "probs".to_owned(),
            datatype: DataType::Fp32,
            shape: vec![3, 2],
            data: TensorData::Fixed(Bytes::from_static(&[0; 20])),
        };
        let error = tensors_to_columns(&[short], 3).expect_err("5 floats for 6");
        assert!(
            matches!(&error, Error::BadOutput { output, .. } if output == "probs"),
            "{error:?}"
        );
        let strings_for_floats = Tensor {
            name: "probs".to_owned(),
            datatype: DataType::Fp32,
            shape: vec![3],
            data: TensorData::Strings(vec![Bytes::new(); 3]),
        };
        tensors_to_columns(&[strings_for_floats], 3).expect_err("strings are not FP32 data");

        // Output bytes are shared with the column when aligned for their
        // type, and copied when not: the same values either way.
        let floats: Vec<u8> = [1.5f32, -2.0, 0.25]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let mut shifted = vec![0u8];
        shifted.extend_from_slice(&floats);
        let shifted = Bytes::from(shifted);
        for bytes in [Bytes::from(floats.clone()), shifted.slice(1..)] {
            let tensor = Tensor::from_raw("y", DataType::Fp32, vec![3], bytes).expect("y");
            let columns = tensors_to_columns(&[tensor], 3).expect("columns");
            assert_eq!(
                columns[0].1.as_primitive::<Float32Type>().values().to_vec(),
                vec![1.5, -2.0, 0.25]
            );
        }
    }
}
