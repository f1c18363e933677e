//! A minimal reader of TensorBoard event files (TFRecord frames, CRC32C, the Event protobuf),
//! written from the format's description to check what our writer produces.
#![allow(dead_code)]

/// CRC-32C bit by bit, so that the reader does not trust the writer's table.
pub fn crc32c_bitwise(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

// The mask spelled as TensorFlow documents it, not as the writer computes it.
#[allow(clippy::manual_rotate)]
pub fn unmask_ok(data: &[u8], masked: u32) -> bool {
    let crc = crc32c_bitwise(data);
    masked == ((crc >> 15) | (crc << 17)).wrapping_add(0xa282_ead8)
}

/// Splits a TFRecord file into its records, checking both checksums of every frame.
pub fn read_records(bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut records = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let len_bytes = &bytes[at..at + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
        let len_crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap());
        assert!(
            unmask_ok(len_bytes, len_crc),
            "length checksum at byte {at}"
        );
        let data = &bytes[at + 12..at + 12 + len];
        let data_crc = u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap());
        assert!(unmask_ok(data, data_crc), "data checksum at byte {at}");
        records.push(data.to_vec());
        at += 16 + len;
    }
    records
}

/// A protobuf field value, as far as events need.
#[derive(Debug)]
pub enum Field {
    Varint(u64),
    Fixed64([u8; 8]),
    Fixed32([u8; 4]),
    Bytes(Vec<u8>),
}

pub fn read_varint(buf: &[u8], at: &mut usize) -> u64 {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = buf[*at];
        *at += 1;
        v |= ((b & 0x7f) as u64) << shift;
        if b & 0x80 == 0 {
            return v;
        }
    }
    panic!("varint longer than 10 bytes");
}

pub fn read_fields(buf: &[u8]) -> Vec<(u64, Field)> {
    let mut fields = Vec::new();
    let mut at = 0;
    while at < buf.len() {
        let key = read_varint(buf, &mut at);
        let field = match key & 7 {
            0 => Field::Varint(read_varint(buf, &mut at)),
            1 => {
                at += 8;
                Field::Fixed64(buf[at - 8..at].try_into().unwrap())
            }
            2 => {
                let len = read_varint(buf, &mut at) as usize;
                at += len;
                Field::Bytes(buf[at - len..at].to_vec())
            }
            5 => {
                at += 4;
                Field::Fixed32(buf[at - 4..at].try_into().unwrap())
            }
            wire => panic!("unexpected wire type {wire}"),
        };
        fields.push((key >> 3, field));
    }
    fields
}

#[derive(Debug, Default, PartialEq)]
pub struct Event {
    pub wall_time: f64,
    pub step: i64,
    pub file_version: Option<String>,
    pub scalars: Vec<(String, f32)>,
}

pub fn decode_event(data: &[u8]) -> Event {
    let mut event = Event::default();
    for (number, field) in read_fields(data) {
        match (number, field) {
            (1, Field::Fixed64(b)) => event.wall_time = f64::from_le_bytes(b),
            (2, Field::Varint(v)) => event.step = v as i64,
            (3, Field::Bytes(b)) => event.file_version = Some(String::from_utf8(b).unwrap()),
            (5, Field::Bytes(b)) => event.scalars.extend(decode_summary(&b)),
            other => panic!("unexpected Event field {other:?}"),
        }
    }
    event
}

pub fn decode_summary(data: &[u8]) -> Vec<(String, f32)> {
    read_fields(data)
        .into_iter()
        .map(|(number, field)| match (number, field) {
            (1, Field::Bytes(value)) => decode_summary_value(&value),
            other => panic!("unexpected Summary field {other:?}"),
        })
        .collect()
}

pub fn decode_summary_value(data: &[u8]) -> (String, f32) {
    let (mut tag, mut value) = (None, None);
    for (number, field) in read_fields(data) {
        match (number, field) {
            (1, Field::Bytes(b)) => tag = Some(String::from_utf8(b).unwrap()),
            (2, Field::Fixed32(b)) => value = Some(f32::from_le_bytes(b)),
            other => panic!("unexpected Summary.Value field {other:?}"),
        }
    }
    (tag.expect("tag"), value.expect("simple_value"))
}
