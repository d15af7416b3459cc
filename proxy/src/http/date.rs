//! The `Date` field value (RFC 9110 §6.6.1), formatted once a second per thread.

use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};

/// An IMF-fixdate is 29 bytes.
const DATE_LEN: usize = 29;

thread_local! {
    static CACHE: RefCell<(u64, [u8; DATE_LEN])> = const { RefCell::new((u64::MAX, [0; DATE_LEN])) };
}

/// Calls `f` with the current date as an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`).
pub fn with_date<T>(f: impl FnOnce(&[u8]) -> T) -> T {
    let now = SystemTime::now();
    let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHE.with(|cache| {
        let mut cache = cache.borrow_mut();
        if cache.0 != second {
            let text = httpdate::fmt_http_date(now);
            let mut bytes = [b' '; DATE_LEN];
            let len = text.len().min(DATE_LEN);
            bytes[..len].copy_from_slice(&text.as_bytes()[..len]);
            *cache = (second, bytes);
        }
        f(&cache.1)
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn dates_are_imf_fixdates() {
        let date = super::with_date(|d| String::from_utf8(d.to_vec()).expect("ascii"));
        assert_eq!(date.len(), 29);
        assert!(date.ends_with(" GMT"), "{date}");
        assert!(httpdate::parse_http_date(&date).is_ok(), "{date}");
    }
}
