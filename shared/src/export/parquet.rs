//! Parquet parts: the requested top-level columns, decoded a batch at a time and handed out
//! row by row as text, with exact decimals and UTC timestamps.

use super::compression::open_error;
use super::{ExportError, Next, ReadBudget, Record, RecordReader, Value};
use crate::store::{LocalObject, ObjectStore};
use arrow_array::cast::AsArray;
use arrow_array::types::{
    Date32Type, Date64Type, Float16Type, Float32Type, Float64Type, Int16Type, Int32Type, Int64Type,
    Int8Type, TimestampMicrosecondType, TimestampMillisecondType, TimestampNanosecondType,
    TimestampSecondType, UInt16Type, UInt32Type, UInt64Type, UInt8Type,
};
use arrow_array::{
    Array, ArrayRef, ArrowPrimitiveType, BooleanArray, Decimal128Array, Decimal256Array,
    GenericStringArray, Int64Array, OffsetSizeTrait, PrimitiveArray, StringViewArray,
};
use arrow_cast::display::{ArrayFormatter, FormatOptions};
use arrow_schema::{ArrowError, DataType, TimeUnit};
use chrono::{DateTime, Datelike, NaiveDate, NaiveDateTime, Timelike};
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::arrow::ProjectionMask;
use std::fmt::{Display, Write};
use std::fs::File;

const BATCH_ROWS: usize = 4096;

pub(crate) struct ParquetReader {
    file: String,
    batches: ParquetRecordBatchReader,
    /// Column of the decoded batch holding each requested column.
    positions: Vec<usize>,
    /// Converters over the current batch, one per batch column.
    columns: Vec<Column>,
    rows_in_batch: usize,
    row: usize,
    /// Rows in the batches before the current one.
    rows_before: u64,
    done: bool,
    /// Keeps a downloaded copy alive while it is read.
    _local: LocalObject,
}

impl ParquetReader {
    pub(crate) fn open(
        store: &dyn ObjectStore,
        key: &str,
        columns: &[String],
        budget: &ReadBudget,
    ) -> Result<Self, ExportError> {
        let local = store.local_path(key).map_err(|e| open_error(key, e))?;
        let unreadable = |reason: String| ExportError::Unreadable {
            file: key.to_string(),
            reason,
        };
        let file = File::open(local.path()).map_err(|e| unreadable(e.to_string()))?;
        // The file's size counts against the byte cap (its rows against the row cap).
        let size = file
            .metadata()
            .map_err(|e| unreadable(e.to_string()))?
            .len();
        budget.charge(key, size)?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(file)
            .map_err(|e| unreadable(format!("not a Parquet file or truncated: {e}")))?;
        let fields = builder.schema().fields().clone();
        let mut indices = Vec::with_capacity(columns.len());
        for column in columns {
            let want = column.trim();
            let found = fields.iter().position(|f| f.name() == want).or_else(|| {
                let lower = want.to_lowercase();
                fields.iter().position(|f| f.name().to_lowercase() == lower)
            });
            match found {
                Some(i) => indices.push(i),
                None => {
                    return Err(ExportError::MissingColumn {
                        file: key.to_string(),
                        column: column.clone(),
                        available: fields
                            .iter()
                            .map(|f| f.name().as_str())
                            .collect::<Vec<_>>()
                            .join(","),
                    })
                }
            }
        }
        // A projected batch holds the selected columns in file order, once each.
        let mut roots = indices.clone();
        roots.sort_unstable();
        roots.dedup();
        let positions = indices
            .iter()
            .map(|&i| roots.partition_point(|&r| r < i))
            .collect();
        let mask = ProjectionMask::roots(builder.parquet_schema(), roots.iter().copied());
        let batches = builder
            .with_projection(mask)
            .with_batch_size(BATCH_ROWS)
            .build()
            .map_err(|e| unreadable(format!("not a Parquet file or truncated: {e}")))?;
        Ok(Self {
            file: key.to_string(),
            batches,
            positions,
            columns: Vec::new(),
            rows_in_batch: 0,
            row: 0,
            rows_before: 0,
            done: false,
            _local: local,
        })
    }
}

impl RecordReader for ParquetReader {
    fn next(&mut self, record: &mut Record) -> Result<Next, ExportError> {
        let n = self.positions.len();
        if record.values.len() != n {
            record.values.truncate(n);
            record.values.resize_with(n, Value::default);
        }
        while self.row == self.rows_in_batch {
            if self.done {
                return Ok(Next::End);
            }
            self.rows_before += self.rows_in_batch as u64;
            self.rows_in_batch = 0;
            self.row = 0;
            match self.batches.next() {
                None => {
                    self.done = true;
                    return Ok(Next::End);
                }
                Some(Err(e)) => {
                    self.done = true;
                    return Err(ExportError::Unreadable {
                        file: self.file.clone(),
                        reason: format!("decoding failed after row {}: {e}", self.rows_before),
                    });
                }
                Some(Ok(batch)) => {
                    self.columns = batch
                        .columns()
                        .iter()
                        .map(Column::new)
                        .collect::<Result<_, _>>()
                        .map_err(|e| ExportError::Unreadable {
                            file: self.file.clone(),
                            reason: format!("cannot convert a column: {e}"),
                        })?;
                    self.rows_in_batch = batch.num_rows();
                }
            }
        }
        for (slot, &pos) in record.values.iter_mut().zip(&self.positions) {
            if let Some(column) = self.columns.get(pos) {
                column.write(self.row, slot);
            }
        }
        self.row += 1;
        record.line = self.rows_before + self.row as u64;
        Ok(Next::Record)
    }
}

/// A batch column as record values.
enum Column {
    Scalar(Box<dyn Cells>),
    List {
        array: ArrayRef,
        offsets: Vec<usize>,
        items: Box<dyn Cells>,
    },
}

impl Column {
    fn new(array: &ArrayRef) -> Result<Self, ArrowError> {
        let (offsets, values): (Vec<usize>, &ArrayRef) = match array.data_type() {
            DataType::List(_) => {
                let list = array.as_list::<i32>();
                let offsets = list.value_offsets().iter().map(|&o| o as usize).collect();
                (offsets, list.values())
            }
            DataType::LargeList(_) => {
                let list = array.as_list::<i64>();
                let offsets = list.value_offsets().iter().map(|&o| o as usize).collect();
                (offsets, list.values())
            }
            DataType::FixedSizeList(_, size) => {
                let list = array.as_fixed_size_list();
                let size = (*size).max(0) as usize;
                let offsets = (0..=list.len()).map(|i| i * size).collect();
                (offsets, list.values())
            }
            _ => return Ok(Column::Scalar(cells(array)?)),
        };
        Ok(Column::List {
            array: array.clone(),
            offsets,
            items: cells(values)?,
        })
    }

    fn write(&self, row: usize, slot: &mut Value) {
        match self {
            Column::Scalar(cells) => {
                if cells.is_null(row) {
                    slot.set_null();
                } else {
                    slot.set_text("");
                    if let Value::Text(out) = slot {
                        cells.write(row, out);
                    }
                }
            }
            Column::List {
                array,
                offsets,
                items,
            } => {
                if array.is_null(row) {
                    slot.set_null();
                    return;
                }
                if !matches!(slot, Value::List(_)) {
                    *slot = Value::List(Vec::new());
                }
                if let Value::List(list) = slot {
                    list.clear();
                    let (from, to) = (offsets[row], offsets[row + 1]);
                    for item in from..to {
                        if !items.is_null(item) {
                            let mut text = String::new();
                            items.write(item, &mut text);
                            list.push(text);
                        }
                    }
                }
            }
        }
    }
}

/// Text of the cells of one array.
trait Cells: Send {
    fn is_null(&self, i: usize) -> bool;
    /// Append the text of a non-null cell.
    fn write(&self, i: usize, out: &mut String);
}

fn cells(array: &ArrayRef) -> Result<Box<dyn Cells>, ArrowError> {
    fn prim<T>(array: &ArrayRef) -> Box<dyn Cells>
    where
        T: ArrowPrimitiveType,
        T::Native: Display,
    {
        Box::new(Prim(array.as_primitive::<T>().clone()))
    }
    fn ts<T: ArrowPrimitiveType<Native = i64>>(
        array: &ArrayRef,
        unit: TimeUnit,
        utc: bool,
    ) -> Box<dyn Cells> {
        let a = array.as_primitive::<T>();
        Box::new(Timestamp {
            values: Int64Array::new(a.values().clone(), a.nulls().cloned()),
            unit,
            utc,
        })
    }
    Ok(match array.data_type() {
        DataType::Utf8 => Box::new(Str(array.as_string::<i32>().clone())),
        DataType::LargeUtf8 => Box::new(Str(array.as_string::<i64>().clone())),
        DataType::Utf8View => Box::new(View(array.as_string_view().clone())),
        DataType::Boolean => Box::new(Bool(array.as_boolean().clone())),
        DataType::Int8 => prim::<Int8Type>(array),
        DataType::Int16 => prim::<Int16Type>(array),
        DataType::Int32 => prim::<Int32Type>(array),
        DataType::Int64 => prim::<Int64Type>(array),
        DataType::UInt8 => prim::<UInt8Type>(array),
        DataType::UInt16 => prim::<UInt16Type>(array),
        DataType::UInt32 => prim::<UInt32Type>(array),
        DataType::UInt64 => prim::<UInt64Type>(array),
        DataType::Float16 => prim::<Float16Type>(array),
        DataType::Float32 => prim::<Float32Type>(array),
        DataType::Float64 => prim::<Float64Type>(array),
        DataType::Decimal128(_, scale) => Box::new(Decimal128 {
            values: array.as_primitive().clone(),
            scale: *scale,
        }),
        DataType::Decimal256(_, scale) => Box::new(Decimal256 {
            values: array.as_primitive().clone(),
            scale: *scale,
        }),
        DataType::Date32 => Box::new(Date32(array.as_primitive::<Date32Type>().clone())),
        DataType::Date64 => Box::new(Date64(array.as_primitive::<Date64Type>().clone())),
        DataType::Timestamp(unit, tz) => {
            let utc = tz.is_some();
            match unit {
                TimeUnit::Second => ts::<TimestampSecondType>(array, *unit, utc),
                TimeUnit::Millisecond => ts::<TimestampMillisecondType>(array, *unit, utc),
                TimeUnit::Microsecond => ts::<TimestampMicrosecondType>(array, *unit, utc),
                TimeUnit::Nanosecond => ts::<TimestampNanosecondType>(array, *unit, utc),
            }
        }
        DataType::Dictionary(_, _) => {
            let dict = array.as_any_dictionary();
            Box::new(Dictionary {
                array: array.clone(),
                keys: dict.normalized_keys(),
                values: cells(dict.values())?,
            })
        }
        _ => {
            let formatter = ArrayFormatter::try_new(array.as_ref(), &FormatOptions::default())?;
            let mut texts = Vec::with_capacity(array.len());
            for i in 0..array.len() {
                let mut text = String::new();
                if array.is_valid(i) {
                    write!(text, "{}", formatter.value(i))
                        .map_err(|e| ArrowError::ComputeError(e.to_string()))?;
                }
                texts.push(text);
            }
            Box::new(Formatted {
                array: array.clone(),
                texts,
            })
        }
    })
}

struct Str<O: OffsetSizeTrait>(GenericStringArray<O>);
impl<O: OffsetSizeTrait> Cells for Str<O> {
    fn is_null(&self, i: usize) -> bool {
        self.0.is_null(i)
    }
    fn write(&self, i: usize, out: &mut String) {
        out.push_str(self.0.value(i));
    }
}

struct View(StringViewArray);
impl Cells for View {
    fn is_null(&self, i: usize) -> bool {
        self.0.is_null(i)
    }
    fn write(&self, i: usize, out: &mut String) {
        out.push_str(self.0.value(i));
    }
}

struct Bool(BooleanArray);
impl Cells for Bool {
    fn is_null(&self, i: usize) -> bool {
        self.0.is_null(i)
    }
    fn write(&self, i: usize, out: &mut String) {
        out.push_str(if self.0.value(i) { "true" } else { "false" });
    }
}

/// Integers and floats: `Display` is exact for integers and the shortest round-trip text for
/// floats.
struct Prim<T: ArrowPrimitiveType>(PrimitiveArray<T>);
impl<T> Cells for Prim<T>
where
    T: ArrowPrimitiveType,
    T::Native: Display,
{
    fn is_null(&self, i: usize) -> bool {
        self.0.is_null(i)
    }
    fn write(&self, i: usize, out: &mut String) {
        let _ = write!(out, "{}", self.0.value(i));
    }
}

struct Decimal128 {
    values: Decimal128Array,
    scale: i8,
}
impl Cells for Decimal128 {
    fn is_null(&self, i: usize) -> bool {
        self.values.is_null(i)
    }
    fn write(&self, i: usize, out: &mut String) {
        let start = out.len();
        let _ = write!(out, "{}", self.values.value(i));
        place_decimal_point(out, start, self.scale);
    }
}

struct Decimal256 {
    values: Decimal256Array,
    scale: i8,
}
impl Cells for Decimal256 {
    fn is_null(&self, i: usize) -> bool {
        self.values.is_null(i)
    }
    fn write(&self, i: usize, out: &mut String) {
        let start = out.len();
        let _ = write!(out, "{}", self.values.value(i));
        place_decimal_point(out, start, self.scale);
    }
}

/// Turn the unscaled integer in `out[start..]` into its decimal text: 123450 with scale 2 is
/// `1234.50`, -5 with scale 3 is `-0.005`, 12 with scale -2 is `1200`.
fn place_decimal_point(out: &mut String, start: usize, scale: i8) {
    let digits = if out[start..].starts_with('-') {
        start + 1
    } else {
        start
    };
    if scale <= 0 {
        if &out[digits..] != "0" {
            out.extend(std::iter::repeat_n('0', scale.unsigned_abs() as usize));
        }
        return;
    }
    let scale = scale as usize;
    let len = out.len() - digits;
    if len > scale {
        out.insert(out.len() - scale, '.');
    } else {
        let zeros = "0.".chars().chain(std::iter::repeat_n('0', scale - len));
        let padded: String = zeros.collect();
        out.insert_str(digits, &padded);
    }
}

struct Date32(PrimitiveArray<Date32Type>);
impl Cells for Date32 {
    fn is_null(&self, i: usize) -> bool {
        self.0.is_null(i)
    }
    fn write(&self, i: usize, out: &mut String) {
        write_days(out, i64::from(self.0.value(i)));
    }
}

struct Date64(PrimitiveArray<Date64Type>);
impl Cells for Date64 {
    fn is_null(&self, i: usize) -> bool {
        self.0.is_null(i)
    }
    fn write(&self, i: usize, out: &mut String) {
        write_days(out, self.0.value(i).div_euclid(86_400_000));
    }
}

/// Days since 1970-01-01 as `YYYY-MM-DD`.
fn write_days(out: &mut String, days: i64) {
    const UNIX_EPOCH_FROM_CE: i64 = 719_163;
    let date = i32::try_from(days + UNIX_EPOCH_FROM_CE)
        .ok()
        .and_then(NaiveDate::from_num_days_from_ce_opt);
    match date {
        Some(d) => {
            let _ = write!(out, "{:04}-{:02}-{:02}", d.year(), d.month(), d.day());
        }
        None => {
            let _ = write!(out, "{days}");
        }
    }
}

struct Timestamp {
    values: Int64Array,
    unit: TimeUnit,
    /// With a time zone the value is an instant (written in UTC); without, a wall-clock time.
    utc: bool,
}
impl Cells for Timestamp {
    fn is_null(&self, i: usize) -> bool {
        self.values.is_null(i)
    }
    fn write(&self, i: usize, out: &mut String) {
        let v = self.values.value(i);
        let dt = match self.unit {
            TimeUnit::Second => DateTime::from_timestamp(v, 0),
            TimeUnit::Millisecond => DateTime::from_timestamp_millis(v),
            TimeUnit::Microsecond => DateTime::from_timestamp_micros(v),
            TimeUnit::Nanosecond => Some(DateTime::from_timestamp_nanos(v)),
        };
        match dt {
            Some(dt) => write_datetime(out, &dt.naive_utc(), self.utc),
            None => {
                let _ = write!(out, "{v}");
            }
        }
    }
}

/// `YYYY-MM-DDTHH:MM:SS`, fractional seconds only when not zero (3, 6 or 9 digits), `Z` for
/// instants.
fn write_datetime(out: &mut String, dt: &NaiveDateTime, utc: bool) {
    let _ = write!(
        out,
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        dt.year(),
        dt.month(),
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second()
    );
    let nanos = dt.nanosecond();
    let _ = match (nanos % 1_000_000, nanos % 1_000) {
        _ if nanos == 0 => Ok(()),
        (0, _) => write!(out, ".{:03}", nanos / 1_000_000),
        (_, 0) => write!(out, ".{:06}", nanos / 1_000),
        _ => write!(out, ".{nanos:09}"),
    };
    if utc {
        out.push('Z');
    }
}

struct Dictionary {
    array: ArrayRef,
    keys: Vec<usize>,
    values: Box<dyn Cells>,
}
impl Cells for Dictionary {
    fn is_null(&self, i: usize) -> bool {
        self.array.is_null(i) || self.keys.get(i).is_none_or(|&k| self.values.is_null(k))
    }
    fn write(&self, i: usize, out: &mut String) {
        if let Some(&k) = self.keys.get(i) {
            self.values.write(k, out);
        }
    }
}

/// Any other type (structs, maps, binary, times, durations): arrow's display text.
struct Formatted {
    array: ArrayRef,
    texts: Vec<String>,
}
impl Cells for Formatted {
    fn is_null(&self, i: usize) -> bool {
        self.array.is_null(i)
    }
    fn write(&self, i: usize, out: &mut String) {
        out.push_str(&self.texts[i]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_points() {
        let cases = [
            ("123450", 2, "1234.50"),
            ("-123450", 2, "-1234.50"),
            ("-5", 3, "-0.005"),
            ("5", 1, "0.5"),
            ("0", 2, "0.00"),
            ("42", 0, "42"),
            ("12", -2, "1200"),
            ("0", -2, "0"),
        ];
        for (digits, scale, want) in cases {
            let mut out = String::from("x");
            out.push_str(digits);
            place_decimal_point(&mut out, 1, scale);
            assert_eq!(&out[1..], want, "{digits} scale {scale}");
        }
    }

    #[test]
    fn datetimes() {
        let mut out = String::new();
        let dt = DateTime::from_timestamp_micros(1_709_294_400_123_000).unwrap();
        write_datetime(&mut out, &dt.naive_utc(), true);
        assert_eq!(out, "2024-03-01T12:00:00.123Z");
        out.clear();
        write_days(&mut out, 19_783);
        assert_eq!(out, "2024-03-01");
    }

    /// Timestamps with a zone (instants) and without (wall-clock times) in every unit: the
    /// text written for each cell is read exactly, to the second, as UTC by the mapper.
    #[test]
    fn timestamps_in_every_unit_read_exactly_by_the_mapper() {
        use crate::mapping::parse_datetime;
        use arrow_array::{
            TimestampMicrosecondArray, TimestampMillisecondArray, TimestampNanosecondArray,
            TimestampSecondArray,
        };
        use std::sync::Arc;
        // 2024-03-10T23:30:00Z, and half a second before the epoch.
        let s = 1_710_113_400i64;
        let arrays = |tz: Option<&str>| -> Vec<(ArrayRef, [&'static str; 3])> {
            vec![
                (
                    Arc::new(
                        TimestampSecondArray::from(vec![s, -1, i64::MAX]).with_timezone_opt(tz),
                    ),
                    [
                        "2024-03-10T23:30:00",
                        "1969-12-31T23:59:59",
                        "9223372036854775807",
                    ],
                ),
                (
                    Arc::new(
                        TimestampMillisecondArray::from(vec![s * 1_000 + 123, -500, i64::MAX])
                            .with_timezone_opt(tz),
                    ),
                    [
                        "2024-03-10T23:30:00.123",
                        "1969-12-31T23:59:59.500",
                        "9223372036854775807",
                    ],
                ),
                (
                    Arc::new(
                        TimestampMicrosecondArray::from(vec![
                            s * 1_000_000 + 123_456,
                            -500_000,
                            i64::MAX,
                        ])
                        .with_timezone_opt(tz),
                    ),
                    [
                        "2024-03-10T23:30:00.123456",
                        "1969-12-31T23:59:59.500",
                        "9223372036854775807",
                    ],
                ),
                (
                    Arc::new(
                        TimestampNanosecondArray::from(vec![
                            s * 1_000_000_000 + 123_456_789,
                            -500_000_000,
                            i64::MAX,
                        ])
                        .with_timezone_opt(tz),
                    ),
                    [
                        "2024-03-10T23:30:00.123456789",
                        "1969-12-31T23:59:59.500",
                        "2262-04-11T23:47:16.854775807",
                    ],
                ),
            ]
        };
        for tz in [None, Some("UTC"), Some("+05:30")] {
            for (array, texts) in arrays(tz) {
                let c = cells(&array).unwrap();
                for (i, want) in texts.iter().enumerate() {
                    let mut out = String::new();
                    c.write(i, &mut out);
                    let is_number = want.bytes().all(|b| b.is_ascii_digit());
                    let want = match tz {
                        Some(_) if !is_number => format!("{want}Z"),
                        _ => want.to_string(),
                    };
                    assert_eq!(out, want, "{:?} cell {i}", array.data_type());
                    // Out of chrono's range the raw number is written, which is refused
                    // rather than guessed; everything else is read to the second, as UTC.
                    let utc = (!is_number).then(|| format!("{}Z", &want[..19]));
                    assert_eq!(parse_datetime(&out), utc, "{out}");
                }
            }
        }
    }
}
