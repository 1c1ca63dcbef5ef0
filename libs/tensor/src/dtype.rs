//! The v2 protocol's datatypes and their mappings.

use std::fmt;

use shamal_proto::inference::DataType as ConfigDataType;

/// A v2 tensor datatype (the strings of the protocol: "FP32", "BYTES", ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DataType {
    Bool,
    Uint8,
    Uint16,
    Uint32,
    Uint64,
    Int8,
    Int16,
    Int32,
    Int64,
    Fp16,
    Bf16,
    Fp32,
    Fp64,
    /// Variable-length byte strings; each raw element is a 4-byte
    /// little-endian length followed by that many bytes.
    Bytes,
}

impl DataType {
    pub const ALL: [DataType; 14] = [
        DataType::Bool,
        DataType::Uint8,
        DataType::Uint16,
        DataType::Uint32,
        DataType::Uint64,
        DataType::Int8,
        DataType::Int16,
        DataType::Int32,
        DataType::Int64,
        DataType::Fp16,
        DataType::Bf16,
        DataType::Fp32,
        DataType::Fp64,
        DataType::Bytes,
    ];

    /// Parses the protocol's datatype string (exact, upper case).
    pub fn parse(text: &str) -> Option<DataType> {
        Some(match text {
            "BOOL" => DataType::Bool,
            "UINT8" => DataType::Uint8,
            "UINT16" => DataType::Uint16,
            "UINT32" => DataType::Uint32,
            "UINT64" => DataType::Uint64,
            "INT8" => DataType::Int8,
            "INT16" => DataType::Int16,
            "INT32" => DataType::Int32,
            "INT64" => DataType::Int64,
            "FP16" => DataType::Fp16,
            "BF16" => DataType::Bf16,
            "FP32" => DataType::Fp32,
            "FP64" => DataType::Fp64,
            "BYTES" => DataType::Bytes,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DataType::Bool => "BOOL",
            DataType::Uint8 => "UINT8",
            DataType::Uint16 => "UINT16",
            DataType::Uint32 => "UINT32",
            DataType::Uint64 => "UINT64",
            DataType::Int8 => "INT8",
            DataType::Int16 => "INT16",
            DataType::Int32 => "INT32",
            DataType::Int64 => "INT64",
            DataType::Fp16 => "FP16",
            DataType::Bf16 => "BF16",
            DataType::Fp32 => "FP32",
            DataType::Fp64 => "FP64",
            DataType::Bytes => "BYTES",
        }
    }

    /// Bytes per element, `None` for the variable-length BYTES type.
    pub fn element_size(self) -> Option<usize> {
        Some(match self {
            DataType::Bool | DataType::Uint8 | DataType::Int8 => 1,
            DataType::Uint16 | DataType::Int16 | DataType::Fp16 | DataType::Bf16 => 2,
            DataType::Uint32 | DataType::Int32 | DataType::Fp32 => 4,
            DataType::Uint64 | DataType::Int64 | DataType::Fp64 => 8,
            DataType::Bytes => return None,
        })
    }

    /// The model-configuration enum (`TYPE_FP32`, ...) for this datatype.
    pub fn to_config(self) -> ConfigDataType {
        match self {
            DataType::Bool => ConfigDataType::TypeBool,
            DataType::Uint8 => ConfigDataType::TypeUint8,
            DataType::Uint16 => ConfigDataType::TypeUint16,
            DataType::Uint32 => ConfigDataType::TypeUint32,
            DataType::Uint64 => ConfigDataType::TypeUint64,
            DataType::Int8 => ConfigDataType::TypeInt8,
            DataType::Int16 => ConfigDataType::TypeInt16,
            DataType::Int32 => ConfigDataType::TypeInt32,
            DataType::Int64 => ConfigDataType::TypeInt64,
            DataType::Fp16 => ConfigDataType::TypeFp16,
            DataType::Bf16 => ConfigDataType::TypeBf16,
            DataType::Fp32 => ConfigDataType::TypeFp32,
            DataType::Fp64 => ConfigDataType::TypeFp64,
            DataType::Bytes => ConfigDataType::TypeString,
        }
    }

    /// The datatype of a model-configuration enum value, `None` for
    /// `TYPE_INVALID` or unknown values.
    pub fn from_config(value: i32) -> Option<DataType> {
        let config = ConfigDataType::try_from(value).ok()?;
        DataType::ALL
            .into_iter()
            .find(|dtype| dtype.to_config() == config)
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_datatype_round_trips_through_its_name_and_config_enum() {
        for dtype in DataType::ALL {
            assert_eq!(DataType::parse(dtype.as_str()), Some(dtype));
            assert_eq!(DataType::from_config(dtype.to_config() as i32), Some(dtype));
        }
        assert_eq!(DataType::parse("fp32"), None);
        assert_eq!(DataType::parse("FLOAT"), None);
        assert_eq!(DataType::from_config(0), None);
        assert_eq!(DataType::from_config(999), None);
    }
}
