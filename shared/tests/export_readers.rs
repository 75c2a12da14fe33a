//! Export readers over files generated here: CSV dialects, JSONL, Parquet, compression and
//! export locations.

use std::io::Write;
use std::sync::Arc;

use zdsync::export::*;
use zdsync::store::{LocalStore, ObjectStore};

#[derive(Debug, PartialEq)]
enum Row {
    R(u64, Vec<Value>),
    Bad(u64, String),
}
use Row::{Bad, R};

const N: Value = Value::Null;

fn t(s: &str) -> Value {
    Value::Text(s.to_string())
}

fn list(items: &[&str]) -> Value {
    Value::List(items.iter().map(|s| s.to_string()).collect())
}

fn store() -> (tempfile::TempDir, LocalStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::new(dir.path());
    (dir, store)
}

fn columns(cols: &[&str]) -> Vec<String> {
    cols.iter().map(|c| c.to_string()).collect()
}

fn read(
    store: &LocalStore,
    key: &str,
    cols: &[&str],
    options: &ReadOptions,
) -> Result<Vec<Row>, ExportError> {
    let mut reader = open_reader(
        store,
        key,
        &columns(cols),
        options,
        &ReadBudget::new(options),
    )?;
    let mut record = Record::default();
    let mut rows = Vec::new();
    loop {
        match reader.next(&mut record)? {
            Next::Record => rows.push(R(record.line, record.values.clone())),
            Next::Malformed { line, reason } => rows.push(Bad(line, reason)),
            Next::End => return Ok(rows),
        }
    }
}

fn read_ok(store: &LocalStore, key: &str, cols: &[&str], options: &ReadOptions) -> Vec<Row> {
    read(store, key, cols, options).unwrap()
}

fn csv() -> ReadOptions {
    ReadOptions {
        format: Format::Csv,
        ..ReadOptions::default()
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::stream::encode_all(data, 3).unwrap()
}

fn unreadable_reason(result: Result<Vec<Row>, ExportError>, file: &str) -> String {
    match result {
        Err(ExportError::Unreadable { file: f, reason }) => {
            assert_eq!(f, file);
            reason
        }
        other => panic!("expected Unreadable for {file}, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// CSV

#[test]
fn snowflake_csv_with_bom_crlf_upper_case_headers_and_quoting() {
    let (_dir, store) = store();
    let data = "\u{feff}ID,NAME,EMAIL,NOTE\r\n\
        1,\"Lovelace, Ada\",ada@example.com,\"said \"\"hi\"\"\"\r\n\
        2,Grace,grace@example.com,\"two\r\nlines\nthree\"\r\n\
        3,Linus,linus@example.com,\r\n\
        \r\n\
        4,\"\",\"\",plain\r\n";
    store.put("exports/users.csv", data.as_bytes()).unwrap();
    let rows = read_ok(
        &store,
        "exports/users.csv",
        &["email", " Name ", "note", "id"],
        &ReadOptions::default(),
    );
    assert_eq!(
        rows,
        [
            R(
                2,
                vec![
                    t("ada@example.com"),
                    t("Lovelace, Ada"),
                    t("said \"hi\""),
                    t("1")
                ]
            ),
            R(
                3,
                vec![
                    t("grace@example.com"),
                    t("Grace"),
                    t("two\r\nlines\nthree"),
                    t("2")
                ]
            ),
            R(6, vec![t("linus@example.com"), t("Linus"), N, t("3")]),
            R(8, vec![N, N, t("plain"), t("4")]),
        ]
    );
}

#[test]
fn lf_lines_without_final_newline_and_literal_quotes_in_unquoted_fields() {
    let (_dir, store) = store();
    store
        .put("a.csv", b"id,item\n1,5\" screen\n2,it's \"fine\"\n3,last")
        .unwrap();
    assert_eq!(
        read_ok(&store, "a.csv", &["item"], &csv()),
        [
            R(2, vec![t("5\" screen")]),
            R(3, vec![t("it's \"fine\"")]),
            R(4, vec![t("last")]),
        ]
    );
}

#[test]
fn empty_fields_and_null_markers() {
    let (_dir, store) = store();
    store.put("n.csv", b"a,b,c\n,\"\",\\N\nx,NULL,y\n").unwrap();
    // By default `\N` (Snowflake's and Hive's NULL) and an empty field are NULL.
    let default = read_ok(&store, "n.csv", &["a", "b", "c"], &csv());
    assert_eq!(
        default,
        [R(2, vec![N, N, N]), R(3, vec![t("x"), t("NULL"), t("y")]),]
    );
    let literal = ReadOptions {
        null_values: Vec::new(),
        ..csv()
    };
    assert_eq!(
        read_ok(&store, "n.csv", &["c"], &literal),
        [R(2, vec![t("\\N")]), R(3, vec![t("y")])]
    );
    let options = ReadOptions {
        empty_as_null: false,
        null_values: vec!["\\N".into(), "NULL".into()],
        ..csv()
    };
    assert_eq!(
        read_ok(&store, "n.csv", &["a", "b", "c"], &options),
        [R(2, vec![t(""), t(""), N]), R(3, vec![t("x"), N, t("y")])]
    );
}

#[test]
fn tab_delimiter() {
    let (_dir, store) = store();
    store.put("t.tsv", b"id\tname\n1\tA, B\n").unwrap();
    let options = ReadOptions {
        delimiter: b'\t',
        ..ReadOptions::default()
    };
    assert_eq!(
        read_ok(&store, "t.tsv", &["name", "id"], &options),
        [R(2, vec![t("A, B"), t("1")])]
    );
}

#[test]
fn redshift_pipe_delimited_with_backslash_escapes() {
    let (_dir, store) = store();
    let data = b"id|name|note\n\
        1|a\\|b|back\\\\slash\n\
        2|line\\\none|\\N\n\
        3|\"quoted \\\" q\"|\"x|y\"\n\
        4|\"\"|\n\
        5|plain|\\\\N\n";
    store.put("unload/part_0000", data).unwrap();
    let options = ReadOptions {
        delimiter: b'|',
        escape: Escape::Backslash,
        null_values: vec!["\\N".into()],
        ..csv()
    };
    assert_eq!(
        read_ok(
            &store,
            "unload/part_0000",
            &["id", "name", "note"],
            &options
        ),
        [
            R(2, vec![t("1"), t("a|b"), t("back\\slash")]),
            R(3, vec![t("2"), t("line\none"), N]),
            R(5, vec![t("3"), t("quoted \" q"), t("x|y")]),
            R(6, vec![t("4"), N, N]),
            R(7, vec![t("5"), t("plain"), t("\\N")]),
        ]
    );
}

#[test]
fn bad_quoting_is_malformed_and_the_next_row_is_read() {
    let (_dir, store) = store();
    store
        .put(
            "q.csv",
            b"id,name,x\n1,\"Ada \"Countess\" L\",x\n2,\"Bob\",y\n",
        )
        .unwrap();
    assert_eq!(
        read_ok(&store, "q.csv", &["id", "name"], &csv()),
        [
            Bad(
                2,
                "field 2: unexpected character after closing quote".into()
            ),
            R(3, vec![t("2"), t("Bob")]),
        ]
    );
}

#[test]
fn invalid_utf8_only_matters_in_projected_fields() {
    let (_dir, store) = store();
    store
        .put(
            "u.csv",
            b"id,email,junk\n1,a@x.io,\xff\xfe\n2,b\xff@x.io,ok\n3,c@x.io,\"q\xff\"\n",
        )
        .unwrap();
    assert_eq!(
        read_ok(&store, "u.csv", &["id", "email"], &csv()),
        [
            R(2, vec![t("1"), t("a@x.io")]),
            Bad(3, "field 2 (email) is not valid UTF-8".into()),
            R(4, vec![t("3"), t("c@x.io")]),
        ]
    );
}

#[test]
fn wrong_column_count_is_malformed() {
    let (_dir, store) = store();
    store
        .put("c.csv", b"a,b,c,d,e\n1,2,3,4\n1,2,3,4,5\n1,2,\"3\",4,5,6\n")
        .unwrap();
    assert_eq!(
        read_ok(&store, "c.csv", &["e"], &csv()),
        [
            Bad(2, "expected 5 fields (from the header), found 4".into()),
            R(3, vec![t("5")]),
            Bad(4, "expected 5 fields (from the header), found 6".into()),
        ]
    );
}

#[test]
fn unterminated_quote_resynchronises_on_the_next_line() {
    let (_dir, store) = store();
    let mut data = String::from("id,note\n1,\"never closed\n2,ok\n3,fine\n");
    for i in 4..40 {
        data.push_str(&format!("{i},row {i}\n"));
    }
    store.put("open.csv", data.as_bytes()).unwrap();
    let options = ReadOptions {
        max_record_bytes: 64,
        ..csv()
    };
    let rows = read_ok(&store, "open.csv", &["id", "note"], &options);
    assert_eq!(
        rows[0],
        Bad(2, "unterminated quoted field starting on line 2".into())
    );
    assert_eq!(rows[1], R(3, vec![t("2"), t("ok")]));
    assert_eq!(rows[2], R(4, vec![t("3"), t("fine")]));
    assert_eq!(rows.len(), 39);
    assert_eq!(rows[38], R(40, vec![t("39"), t("row 39")]));

    // Reaching the end of the file inside quotes is the same error.
    store
        .put("eof.csv", b"id,note\n1,ok\n2,\"open\n3,still open\n")
        .unwrap();
    assert_eq!(
        read_ok(&store, "eof.csv", &["id", "note"], &csv()),
        [
            R(2, vec![t("1"), t("ok")]),
            Bad(3, "unterminated quoted field starting on line 3".into()),
            R(4, vec![t("3"), t("still open")]),
        ]
    );
}

#[test]
fn missing_column_names_the_file_and_the_header() {
    let (_dir, store) = store();
    store.put("m.csv", b"ID,EMAIL\n1,a@x.io\n").unwrap();
    match read(&store, "m.csv", &["id", "phone"], &csv()) {
        Err(ExportError::MissingColumn {
            file,
            column,
            available,
        }) => {
            assert_eq!(file, "m.csv");
            assert_eq!(column, "phone");
            assert_eq!(available, "ID,EMAIL");
        }
        other => panic!("expected MissingColumn, got {other:?}"),
    }
}

#[test]
fn empty_file_has_no_rows() {
    let (_dir, store) = store();
    store.put("e.csv.gz", &gzip(b"")).unwrap();
    assert_eq!(
        read_ok(&store, "e.csv.gz", &["id"], &ReadOptions::default()),
        []
    );
}

// ---------------------------------------------------------------------------------------------
// JSONL

#[test]
fn jsonl_paths_exact_numbers_lists_and_bad_lines() {
    let (_dir, store) = store();
    let data = concat!(
        r#"{"id":"12345678901234567890","Address":{"City":"Paris","geo":{"lat":0.1}},"tags":["a",null,"b",3],"meta":{"k": [1, 2]},"ok":true}"#,
        "\r\n",
        "\n",
        r#"{"id": 42, "address.city": "dotted key", "tags": [{"x": 1}], "amount": 1.000000000000000000001}"#,
        "\n",
        r#"{"id": 43 "broken": 1}"#,
        "\n",
        "[1, 2]\n",
        r#"{"ID": -7e3, "address": null, "tags": []}"#,
        "\n",
    );
    store.put("events/part-0.jsonl", data.as_bytes()).unwrap();
    let rows = read_ok(
        &store,
        "events/part-0.jsonl",
        &[
            "id",
            "address.city",
            "address.geo.lat",
            "tags",
            "meta",
            "ok",
            "amount",
        ],
        &ReadOptions::default(),
    );
    assert_eq!(
        rows,
        [
            R(
                1,
                vec![
                    t("12345678901234567890"),
                    t("Paris"),
                    t("0.1"),
                    list(&["a", "b", "3"]),
                    t(r#"{"k":[1,2]}"#),
                    t("true"),
                    N,
                ]
            ),
            R(
                3,
                vec![
                    t("42"),
                    t("dotted key"),
                    N,
                    t(r#"[{"x":1}]"#),
                    N,
                    N,
                    t("1.000000000000000000001"),
                ]
            ),
            Bad(4, "invalid JSON: expected `,` or `}` at column 11".into()),
            Bad(5, "expected a JSON object, found an array".into()),
            R(6, vec![t("-7e3"), N, N, list(&[]), N, N, N]),
        ]
    );
}

#[test]
fn jsonl_invalid_utf8_is_malformed() {
    let (_dir, store) = store();
    store
        .put("x.ndjson", b"{\"a\":\"\xff\"}\n{\"a\":\"\\u00e9\"}\n")
        .unwrap();
    let rows = read_ok(&store, "x.ndjson", &["a"], &ReadOptions::default());
    assert!(
        matches!(&rows[0], Bad(1, r) if r.contains("not valid UTF-8")),
        "{rows:?}"
    );
    assert_eq!(rows[1], R(2, vec![t("é")]));
}

// ---------------------------------------------------------------------------------------------
// Parquet

fn write_parquet(store: &LocalStore, key: &str, rows: usize) {
    use arrow_array::builder::{ListBuilder, StringBuilder, StringDictionaryBuilder};
    use arrow_array::types::Int32Type;
    use arrow_array::{
        ArrayRef, BooleanArray, Date32Array, Decimal128Array, Float64Array, Int64Array,
        RecordBatch, TimestampMicrosecondArray,
    };
    use parquet::arrow::ArrowWriter;
    use parquet::file::properties::WriterProperties;

    let id: Int64Array = (0..rows as i64).map(Some).collect();
    let mut plan = StringDictionaryBuilder::<Int32Type>::new();
    for i in 0..rows {
        match i % 4 {
            3 => plan.append_null(),
            k => plan.append_value(["free", "pro", "enterprise"][k]),
        }
    }
    let amount = Decimal128Array::from(
        (0..rows)
            .map(|i| match i {
                0 => Some(123_450),
                1 => Some(-5),
                2 => None,
                _ => Some(i as i128 * 100),
            })
            .collect::<Vec<_>>(),
    )
    .with_precision_and_scale(12, 2)
    .unwrap();
    // 2024-03-01T12:00:00Z, then one second and 250 ms apart.
    let base = 1_709_294_400_000_000i64;
    let created = TimestampMicrosecondArray::from(
        (0..rows)
            .map(|i| Some(base + i as i64 * 1_250_000))
            .collect::<Vec<_>>(),
    )
    .with_timezone("UTC");
    let local = TimestampMicrosecondArray::from(
        (0..rows)
            .map(|i| (i != 1).then_some(base))
            .collect::<Vec<_>>(),
    )
    .with_timezone("+02:00");
    let mut tags = ListBuilder::new(StringBuilder::new());
    for i in 0..rows {
        match i % 3 {
            0 => {
                tags.values().append_value("vip");
                tags.values().append_null();
                tags.values().append_value(format!("t{i}"));
                tags.append(true);
            }
            1 => tags.append(true),
            _ => tags.append_null(),
        }
    }
    let birthday = Date32Array::from(
        (0..rows)
            .map(|i| (i % 2 == 0).then_some(19_783 + i as i32))
            .collect::<Vec<_>>(),
    );
    let score = Float64Array::from((0..rows).map(|i| i as f64 + 0.1).collect::<Vec<_>>());
    let active = BooleanArray::from((0..rows).map(|i| Some(i % 2 == 0)).collect::<Vec<_>>());
    let columns: Vec<(&str, ArrayRef)> = vec![
        ("id", Arc::new(id)),
        ("plan", Arc::new(plan.finish())),
        ("amount", Arc::new(amount)),
        ("created_at", Arc::new(created)),
        ("local_at", Arc::new(local)),
        ("tags", Arc::new(tags.finish())),
        ("birthday", Arc::new(birthday)),
        ("score", Arc::new(score)),
        ("active", Arc::new(active)),
    ];
    let batch = RecordBatch::try_from_iter(columns).unwrap();
    let props = WriterProperties::builder()
        .set_max_row_group_row_count(Some(100))
        .set_dictionary_enabled(true)
        .build();
    let mut buf = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut buf, batch.schema(), Some(props)).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
    store.put(key, &buf).unwrap();
}

#[test]
fn parquet_types_row_groups_and_projection() {
    let (_dir, store) = store();
    write_parquet(&store, "exports/users/part-0.parquet", 450);
    let cols = [
        "AMOUNT",
        "id",
        "plan",
        "created_at",
        "local_at",
        "tags",
        "birthday",
        "score",
        "active",
    ];
    let rows = read_ok(
        &store,
        "exports/users/part-0.parquet",
        &cols,
        &ReadOptions::default(),
    );
    assert_eq!(rows.len(), 450);
    assert_eq!(
        rows[0],
        R(
            1,
            vec![
                t("1234.50"),
                t("0"),
                t("free"),
                t("2024-03-01T12:00:00Z"),
                t("2024-03-01T12:00:00Z"),
                list(&["vip", "t0"]),
                t("2024-03-01"),
                t("0.1"),
                t("true"),
            ]
        )
    );
    assert_eq!(
        rows[1],
        R(
            2,
            vec![
                t("-0.05"),
                t("1"),
                t("pro"),
                t("2024-03-01T12:00:01.250Z"),
                N,
                list(&[]),
                N,
                t("1.1"),
                t("false"),
            ]
        )
    );
    let R(line, values) = &rows[2] else {
        panic!("row 3: {:?}", rows[2]);
    };
    assert_eq!(*line, 3);
    assert_eq!(values[0], N);
    assert_eq!(values[5], N);
    assert_eq!(values[2], t("enterprise"));
    // Rows from later row groups keep their row numbers.
    let R(line, values) = &rows[403] else {
        panic!("row 404: {:?}", rows[403]);
    };
    assert_eq!(*line, 404);
    assert_eq!(values[0], t("403.00"));
    assert_eq!(values[1], t("403"));
    assert_eq!(values[2], N);
    assert_eq!(values[3], t("2024-03-01T12:08:23.750Z"));
}

#[test]
fn parquet_missing_column_and_unreadable_files() {
    let (_dir, store) = store();
    write_parquet(&store, "p.parquet", 10);
    match read(
        &store,
        "p.parquet",
        &["id", "nope"],
        &ReadOptions::default(),
    ) {
        Err(ExportError::MissingColumn {
            column, available, ..
        }) => {
            assert_eq!(column, "nope");
            assert!(available.starts_with("id,plan,amount"), "{available}");
        }
        other => panic!("expected MissingColumn, got {other:?}"),
    }
    let full = std::fs::read(store.root().join("p.parquet")).unwrap();
    store
        .put("truncated.parquet", &full[..full.len() / 2])
        .unwrap();
    let reason = unreadable_reason(
        read(
            &store,
            "truncated.parquet",
            &["id"],
            &ReadOptions::default(),
        ),
        "truncated.parquet",
    );
    assert!(
        reason.starts_with("not a Parquet file or truncated"),
        "{reason}"
    );
    store.put("fake.parquet", b"id\n1\n").unwrap();
    let reason = unreadable_reason(
        read(&store, "fake.parquet", &["id"], &ReadOptions::default()),
        "fake.parquet",
    );
    assert!(
        reason.starts_with("not a Parquet file or truncated"),
        "{reason}"
    );
}

#[test]
fn parquet_rows_and_file_bytes_count_against_the_read_caps() {
    let (_dir, store) = store();
    write_parquet(&store, "p/part-0.parquet", 450);
    write_parquet(&store, "p/part-1.parquet", 450);
    let size = std::fs::metadata(store.root().join("p/part-0.parquet"))
        .unwrap()
        .len();
    // Both parts of one pass, or the error that stopped it.
    let pass = |options: &ReadOptions| -> Result<usize, ExportError> {
        let budget = ReadBudget::new(options);
        let mut rows = 0;
        for key in ["p/part-0.parquet", "p/part-1.parquet"] {
            let mut reader = open_reader(&store, key, &columns(&["id"]), options, &budget)?;
            let mut record = Record::default();
            while reader.next(&mut record)? != Next::End {
                rows += 1;
            }
        }
        Ok(rows)
    };
    assert_eq!(pass(&ReadOptions::default()).unwrap(), 900);
    let cap_error = |r: Result<usize, ExportError>| match r {
        Err(ExportError::TooLarge { file, exceeded }) => (file, exceeded),
        other => panic!("expected the cap error, got {other:?}"),
    };
    let (file, exceeded) = cap_error(pass(&ReadOptions {
        max_rows_read: 600,
        ..ReadOptions::default()
    }));
    assert_eq!(file, "p/part-1.parquet");
    assert_eq!((exceeded.cap, exceeded.read), (ReadCap::Rows, 601));
    // A Parquet file counts its size against the byte cap before it is decoded.
    let (file, exceeded) = cap_error(pass(&ReadOptions {
        max_bytes_read: size + size / 2,
        ..ReadOptions::default()
    }));
    assert_eq!(file, "p/part-1.parquet");
    assert_eq!((exceeded.cap, exceeded.read), (ReadCap::Bytes, 2 * size));
}

// ---------------------------------------------------------------------------------------------
// Compression and format detection

#[test]
fn gzip_and_zstd_are_detected_or_forced() {
    let (_dir, store) = store();
    let csv_data = b"id,name\n1,Ada\n2,\"Grace, H\"\n";
    let jsonl_data = b"{\"id\": 1, \"name\": \"Ada\"}\n{\"id\": 2}\n";
    store.put("u/users.csv.gz", &gzip(csv_data)).unwrap();
    store.put("u/users.csv.zst", &zstd(csv_data)).unwrap();
    store.put("u/events.jsonl.gz", &gzip(jsonl_data)).unwrap();
    store
        .put("u/events.ndjson.zstd", &zstd(jsonl_data))
        .unwrap();
    // No telling extension: compression from the magic bytes, format from the first byte.
    store.put("u/blob1", &gzip(csv_data)).unwrap();
    store.put("u/blob2", &zstd(jsonl_data)).unwrap();
    let want_csv = [
        R(2, vec![t("1"), t("Ada")]),
        R(3, vec![t("2"), t("Grace, H")]),
    ];
    let want_jsonl = [R(1, vec![t("1"), t("Ada")]), R(2, vec![t("2"), N])];
    let auto = ReadOptions::default();
    for key in ["u/users.csv.gz", "u/users.csv.zst", "u/blob1"] {
        assert_eq!(
            read_ok(&store, key, &["id", "name"], &auto),
            want_csv,
            "{key}"
        );
    }
    for key in ["u/events.jsonl.gz", "u/events.ndjson.zstd", "u/blob2"] {
        assert_eq!(
            read_ok(&store, key, &["id", "name"], &auto),
            want_jsonl,
            "{key}"
        );
    }
    let forced = ReadOptions {
        compression: Compression::Gzip,
        format: Format::Csv,
        ..ReadOptions::default()
    };
    assert_eq!(
        read_ok(&store, "u/blob1", &["id", "name"], &forced),
        want_csv
    );
    let forced = ReadOptions {
        compression: Compression::Zstd,
        ..ReadOptions::default()
    };
    assert_eq!(
        read_ok(&store, "u/blob2", &["id", "name"], &forced),
        want_jsonl
    );
    // Forcing gzip on zstd bytes is refused up front.
    let forced = ReadOptions {
        compression: Compression::Gzip,
        ..ReadOptions::default()
    };
    let reason = unreadable_reason(read(&store, "u/blob2", &["id"], &forced), "u/blob2");
    assert!(reason.contains("not gzip-compressed"), "{reason}");
}

#[test]
fn concatenated_gzip_members_and_multi_frame_zstd_are_read_whole() {
    let (_dir, store) = store();
    let mut gz = gzip(b"id,name\n1,a\n");
    gz.extend(gzip(b"2,b\n"));
    gz.extend(gzip(b"3,c\n"));
    store.put("cat.csv.gz", &gz).unwrap();
    let mut zst = zstd(b"id,name\n1,a\n");
    zst.extend(zstd(b"2,b\n3,c\n"));
    store.put("cat.csv.zst", &zst).unwrap();
    for key in ["cat.csv.gz", "cat.csv.zst"] {
        assert_eq!(
            read_ok(&store, key, &["name"], &ReadOptions::default()),
            [R(2, vec![t("a")]), R(3, vec![t("b")]), R(4, vec![t("c")])],
            "{key}"
        );
    }
}

#[test]
fn plain_text_named_gz_is_unreadable() {
    let (_dir, store) = store();
    store
        .put("exports/users.csv.gz", b"id,name\n1,Ada\n")
        .unwrap();
    let reason = unreadable_reason(
        read(
            &store,
            "exports/users.csv.gz",
            &["id"],
            &ReadOptions::default(),
        ),
        "exports/users.csv.gz",
    );
    assert_eq!(
        reason,
        "named .gz but is not gzip-compressed (it starts with `id,na`); rename it or set compression = \"none\""
    );
    // compression = "none" reads it as it is.
    let plain = ReadOptions {
        compression: Compression::None,
        ..ReadOptions::default()
    };
    assert_eq!(
        read_ok(&store, "exports/users.csv.gz", &["name"], &plain),
        [R(2, vec![t("Ada")])]
    );
}

fn big_csv(rows: usize) -> Vec<u8> {
    let mut data = String::from("id,email,name\n");
    for i in 0..rows {
        data.push_str(&format!(
            "{i},user{i}@example.com,Name {}\n",
            i * 7919 % 10007
        ));
    }
    data.into_bytes()
}

#[test]
fn truncated_compressed_files_are_unreadable() {
    let (_dir, store) = store();
    let data = big_csv(60_000);
    let gz = gzip(&data);
    store.put("t.csv.gz", &gz[..gz.len() * 2 / 3]).unwrap();
    let zst = zstd(&data);
    store.put("t.csv.zst", &zst[..zst.len() * 2 / 3]).unwrap();
    for (key, what) in [("t.csv.gz", "gzip"), ("t.csv.zst", "zstd")] {
        let reason = unreadable_reason(read(&store, key, &["id"], &ReadOptions::default()), key);
        assert!(
            reason.starts_with("read failed after line "),
            "{key}: {reason}"
        );
        assert!(
            reason.contains(&format!("{what} stream is truncated or corrupt")),
            "{key}: {reason}"
        );
    }
}

#[test]
fn format_is_sniffed_from_magic_extension_and_first_byte() {
    let (_dir, store) = store();
    write_parquet(&store, "noext", 3);
    store.put("data.txt", b"{\"id\":1}\n").unwrap(); // extension wins: CSV
    store.put("data", b"  {\"id\":1}\n").unwrap();
    let auto = ReadOptions::default();
    assert_eq!(read_ok(&store, "noext", &["id"], &auto).len(), 3);
    assert_eq!(
        read_ok(&store, "data.txt", &["{\"id\":1}"], &auto),
        Vec::<Row>::new()
    );
    assert_eq!(
        read_ok(&store, "data", &["id"], &auto),
        [R(1, vec![t("1")])]
    );
    match read(&store, "absent.csv", &["id"], &auto) {
        Err(ExportError::NotFound { location, .. }) => assert_eq!(location, "absent.csv"),
        other => panic!("expected NotFound, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Locations

fn keys(parts: &[zdsync::store::ObjectMeta]) -> Vec<&str> {
    parts.iter().map(|p| p.key.as_str()).collect()
}

#[test]
fn prefix_lists_data_parts_only() {
    let (_dir, store) = store();
    for i in [2, 0, 1] {
        store
            .put(&format!("exports/users/part_{i:04}.csv"), b"id\n1\n")
            .unwrap();
    }
    store.put("exports/users/_SUCCESS", b"").unwrap();
    store.put("exports/users/.part_0000.csv.crc", b"x").unwrap();
    store.put("exports/users/part_0003.csv.crc", b"x").unwrap();
    store.put("exports/users/part_0004.csv", b"").unwrap();
    store.put("exports/users/manifest", b"{}").unwrap();
    store
        .put("exports/users_old/part_0000.csv", b"id\n")
        .unwrap();
    let want = [
        "exports/users/part_0000.csv",
        "exports/users/part_0001.csv",
        "exports/users/part_0002.csv",
    ];
    assert_eq!(keys(&resolve(&store, "exports/users/").unwrap()), want);
    assert_eq!(keys(&resolve(&store, "exports/users").unwrap()), want);
    assert_eq!(keys(&resolve(&store, "exports/users/part_").unwrap()), want);
    assert_eq!(
        keys(&resolve(&store, "exports/users/part_0001.csv").unwrap()),
        ["exports/users/part_0001.csv"]
    );
    // Every part reads through the same options.
    let mut total = 0;
    for part in resolve(&store, "exports/users/").unwrap() {
        total += read_ok(&store, &part.key, &["id"], &ReadOptions::default()).len();
    }
    assert_eq!(total, 3);
    match resolve(&store, "exports/nothing/") {
        Err(ExportError::NotFound { location, hint }) => {
            assert_eq!(location, "exports/nothing/");
            assert!(hint.contains("relative to the store root"), "{hint}");
        }
        other => panic!("expected NotFound, got {other:?}"),
    }
}

#[test]
fn redshift_manifest_lists_its_entries() {
    let (_dir, store) = store();
    store
        .put("unload/users_0000_part_00.gz", &gzip(b"1|a\n"))
        .unwrap();
    store
        .put("unload/users_0001_part_00.gz", &gzip(b"2|b\n"))
        .unwrap();
    let manifest = r#"{
      "entries": [
        {"url": "s3://bucket/unload/users_0001_part_00.gz", "mandatory": true, "meta": {"content_length": 24}},
        {"url": "s3://bucket/unload/users_0000_part_00.gz", "mandatory": true},
        {"url": "s3://bucket/unload/users_0002_part_00.gz", "mandatory": false}
      ],
      "schema": {"elements": [{"name": "id"}]}
    }"#;
    store
        .put("unload/users_manifest", manifest.as_bytes())
        .unwrap();
    store.put("unload/users.json", manifest.as_bytes()).unwrap();
    let want = [
        "unload/users_0001_part_00.gz",
        "unload/users_0000_part_00.gz",
    ];
    assert_eq!(
        keys(&resolve(&store, "unload/users_manifest").unwrap()),
        want
    );
    // Recognised by its content, whatever its name.
    assert_eq!(keys(&resolve(&store, "unload/users.json").unwrap()), want);
    // `MANIFEST VERBOSE` names the columns.
    assert_eq!(
        resolve_export(&store, "unload/users_manifest")
            .unwrap()
            .columns,
        Some(vec!["id".to_string()])
    );

    let missing = manifest.replace("users_0000_part_00", "users_0009_part_00");
    store
        .put("unload/missing.manifest", missing.as_bytes())
        .unwrap();
    match resolve(&store, "unload/missing.manifest") {
        Err(ExportError::NotFound { location, hint }) => {
            assert_eq!(location, "s3://bucket/unload/users_0009_part_00.gz");
            assert!(hint.contains("unload/missing.manifest"), "{hint}");
        }
        other => panic!("expected NotFound, got {other:?}"),
    }
    store
        .put("unload/bad.manifest", b"{\"entries\": [")
        .unwrap();
    assert!(matches!(
        resolve(&store, "unload/bad.manifest"),
        Err(ExportError::BadManifest { file, .. }) if file == "unload/bad.manifest"
    ));
    store
        .put("unload/empty.manifest", b"{\"other\": 1}")
        .unwrap();
    assert!(matches!(
        resolve(&store, "unload/empty.manifest"),
        Err(ExportError::BadManifest { .. })
    ));
}

#[test]
fn many_rows_through_gzip_and_a_small_thread_pipeline() {
    let (_dir, store) = store();
    let data = big_csv(100_000);
    store.put("big.csv.gz", &gzip(&data)).unwrap();
    let mut reader = open_reader(
        &store,
        "big.csv.gz",
        &columns(&["email", "id"]),
        &ReadOptions::default(),
        &ReadBudget::new(&ReadOptions::default()),
    )
    .unwrap();
    let mut record = Record::default();
    let mut n = 0u64;
    while let Next::Record = reader.next(&mut record).unwrap() {
        assert_eq!(record.line, n + 2);
        n += 1;
    }
    assert_eq!(n, 100_000);
    assert_eq!(record.values.len(), 2);
    // Dropping a reader mid-file stops its decompression thread without hanging.
    let mut reader = open_reader(
        &store,
        "big.csv.gz",
        &columns(&["id"]),
        &ReadOptions::default(),
        &ReadBudget::new(&ReadOptions::default()),
    )
    .unwrap();
    assert_eq!(reader.next(&mut record).unwrap(), Next::Record);
    drop(reader);
    let _ = store.head("big.csv.gz").unwrap();
}
