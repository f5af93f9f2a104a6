//! A record's headers read without rdkafka's `Headers::try_get`, which
//! unwraps each name's UTF-8 (`CStr::to_str().unwrap()`): a client that
//! writes names as bytes (librdkafka in C, Go's clients) would stop a
//! consumer with one record. The one place this crate reads headers, and the
//! one place it needs `unsafe`.
#![allow(unsafe_code)]

use std::ffi::{CStr, c_char, c_void};
use std::ptr;

use rdkafka::bindings::{
    rd_kafka_header_cnt, rd_kafka_header_get_all, rd_kafka_headers_t, rd_kafka_resp_err_t,
};
use rdkafka::message::{BorrowedHeaders, OwnedHeaders};

/// The headers of a borrowed record and of an owned one, seen the same way
/// (what [`decode_record`](crate::decode_record) reads).
pub trait RecordHeaders {
    /// These headers, borrowed.
    fn borrowed(&self) -> &BorrowedHeaders;
}

impl RecordHeaders for BorrowedHeaders {
    fn borrowed(&self) -> &BorrowedHeaders {
        self
    }
}

impl RecordHeaders for OwnedHeaders {
    fn borrowed(&self) -> &BorrowedHeaders {
        self.as_borrowed()
    }
}

/// One header of a record: its name, as bytes (a client may write a name
/// that is not UTF-8), and its value (`None` when null), borrowed from the
/// record.
pub(crate) type Pair<'a> = (&'a [u8], Option<&'a [u8]>);

/// The headers of `record`, in order, borrowed from it.
pub(crate) fn pairs<M>(record: &M) -> impl Iterator<Item = Pair<'_>>
where
    M: rdkafka::Message,
    M::Headers: RecordHeaders,
{
    let native = record.headers().map_or(ptr::null(), |headers| {
        ptr::from_ref::<BorrowedHeaders>(headers.borrowed()).cast::<rd_kafka_headers_t>()
    });
    // SAFETY: a `BorrowedHeaders` reference is the address of the record's
    // native headers (rdkafka converts it the same way), alive as long as
    // the record borrowed here.
    let count = if native.is_null() {
        0
    } else {
        unsafe { rd_kafka_header_cnt(native) }
    };
    (0..count).filter_map(move |idx| {
        let mut name: *const c_char = ptr::null();
        let mut value: *const c_void = ptr::null();
        let mut size = 0usize;
        // SAFETY: `native` is valid (above) and `idx` below its count; the
        // name is NUL-terminated and the value `size` bytes long, both owned
        // by the headers, so borrowed for as long as the record.
        unsafe {
            let err = rd_kafka_header_get_all(native, idx, &mut name, &mut value, &mut size);
            if err != rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
                return None;
            }
            let name = CStr::from_ptr(name).to_bytes();
            let value =
                (!value.is_null()).then(|| std::slice::from_raw_parts(value.cast::<u8>(), size));
            Some((name, value))
        }
    })
}

/// The value of the first header named `key` in `record`, as text.
pub(crate) fn value<M>(record: &M, key: &str) -> Option<String>
where
    M: rdkafka::Message,
    M::Headers: RecordHeaders,
{
    pairs(record)
        .find(|(name, _)| *name == key.as_bytes())
        .and_then(|(_, value)| value)
        .map(|value| String::from_utf8_lossy(value).into_owned())
}
