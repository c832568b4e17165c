//! Cutting text for people to read (error messages kept with an attempt,
//! Slack sections): one place decides where a cut goes and how it shows.

use std::borrow::Cow;

/// The first `keep` characters of `text` and an ellipsis, or `text` itself
/// when it has no more than `keep`. Cuts fall on character boundaries, so
/// multi-byte text never panics or turns into replacement characters.
pub fn ellipsize(text: &str, keep: usize) -> Cow<'_, str> {
    ellipsize_before(text, keep, |head| head)
}

/// As [`ellipsize`], but `back_off` may move the cut earlier (never later):
/// a cut inside an escape sequence (Slack's `&amp;`) would show as litter.
pub fn ellipsize_before<'a>(
    text: &'a str,
    keep: usize,
    back_off: impl FnOnce(&'a str) -> &'a str,
) -> Cow<'a, str> {
    match text.char_indices().nth(keep) {
        Some((i, _)) => Cow::Owned(format!("{}…", back_off(&text[..i]))),
        None => Cow::Borrowed(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ellipsize_keeps_whole_characters() {
        assert_eq!(ellipsize("ééé", 2), "éé…");
        assert_eq!(ellipsize("éé", 2), "éé");
        assert_eq!(ellipsize("", 0), "");
        assert_eq!(ellipsize_before("ab&amp;cd", 5, |h| &h[..2]), "ab…");
    }
}
