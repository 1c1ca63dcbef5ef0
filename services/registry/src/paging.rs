//! Keyset pagination of the registry's lists, in one place: every list
//! validates `page_size`, decodes `page_token` and builds its next token the
//! same way.
//!
//! A list is read in key order after the key of the previous page's last
//! item. One row more than the page is fetched: that extra row only says
//! whether a next page exists, and the token is the key of the page's last
//! item.

use std::str::FromStr;

use crate::error::{RegistryError, Result};
use crate::model::Page;

/// Items per page when the client names no size.
const DEFAULT_PAGE_SIZE: i64 = 50;

/// A validated page request: at most `limit` items whose key comes after
/// `after`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PageRequest<K> {
    /// Items per page: 1..=500.
    pub limit: i64,
    /// The key of the previous page's last item; `K::default()` (the empty
    /// name, number 0) for the first page.
    pub after: K,
}

impl<K: FromStr + Default> PageRequest<K> {
    /// Validates `page_size` (default 50, 1..=500), then decodes
    /// `page_token` (a token an earlier page of the same list returned).
    pub fn new(page_size: Option<u32>, page_token: Option<&str>) -> Result<PageRequest<K>> {
        let limit = match page_size {
            None => DEFAULT_PAGE_SIZE,
            Some(size @ 1..=500) => i64::from(size),
            Some(_) => {
                return Err(RegistryError::invalid(
                    "page_size",
                    "must be between 1 and 500",
                ));
            }
        };
        let after = match page_token {
            None => K::default(),
            Some(token) => decode_token(token)?.parse().map_err(|_| not_a_token())?,
        };
        Ok(PageRequest { limit, after })
    }

    /// The rows to fetch: one more than the page, to learn whether a next
    /// page exists.
    pub fn fetch_limit(&self) -> i64 {
        self.limit + 1
    }

    /// The page of `items` (fetched with [`fetch_limit`](Self::fetch_limit)
    /// rows), with a next-page token made of `key` of its last item when
    /// more follow.
    pub fn page<T>(&self, mut items: Vec<T>, key: impl Fn(&T) -> String) -> Page<T> {
        let next_page_token = if items.len() as i64 > self.limit {
            items.truncate(self.limit as usize);
            items.last().map(|last| encode_token(&key(last)))
        } else {
            None
        };
        Page {
            items,
            next_page_token,
        }
    }
}

/// Page tokens are opaque to clients: base64url of the last key returned.
fn encode_token(key: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key)
}

fn decode_token(token: &str) -> Result<String> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .ok_or_else(not_a_token)
}

fn not_a_token() -> RegistryError {
    RegistryError::invalid("page_token", "is not a token this API returned")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_token_names_the_last_item_of_a_full_page() {
        let request = PageRequest::<i64>::new(Some(2), None).unwrap();
        assert_eq!(request.after, 0);
        assert_eq!(request.fetch_limit(), 3);
        let page = request.page(vec![1, 2, 3], ToString::to_string);
        assert_eq!(page.items, vec![1, 2]);
        let next = PageRequest::<i64>::new(Some(2), page.next_page_token.as_deref()).unwrap();
        assert_eq!(next.after, 2);
        let last = next.page(vec![3], ToString::to_string);
        assert_eq!(last.next_page_token, None);
    }

    #[test]
    fn bad_sizes_and_tokens_are_refused() {
        assert_eq!(PageRequest::<String>::new(None, None).unwrap().limit, 50);
        for size in [0, 501] {
            assert!(PageRequest::<String>::new(Some(size), None).is_err());
        }
        assert!(PageRequest::<String>::new(None, Some("!")).is_err());
        let name = PageRequest::<String>::new(None, Some(&encode_token("abc"))).unwrap();
        assert_eq!(name.after, "abc");
        // A name token is not a number token.
        assert!(PageRequest::<i64>::new(None, Some(&encode_token("abc"))).is_err());
    }
}
