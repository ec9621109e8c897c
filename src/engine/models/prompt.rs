//! AUTOMATIC1111's prompt syntax: emphasis `(word)` ×1.1, `[word]` ÷1.1, `(word:1.3)`, escapes and
//! `BREAK` (`parse_prompt_attention`), and the token chunks a prompt of any length becomes
//! (`PromptTokens`): 75 tokens each, cut after a nearby comma, each one 77-token text-encoder input.

use candle_core::{D, DType, Tensor};

use crate::engine::Result;
use crate::engine::models::tokenizer::{CONTEXT_LENGTH, ClipTokenizer, END_OF_TEXT, MAX_PROMPT_TOKENS, START_OF_TEXT};

/// A1111's `comma_padding_backtrack` default: a chunk that fills up within this many tokens of a
/// comma ends at the comma, and the words after it open the next chunk.
pub const COMMA_BACKTRACK: usize = 20;
/// CLIP's id for `,</w>`.
pub const COMMA: u32 = 267;
/// `(word)` multiplies the weight by this; `[word]` by its inverse.
pub const EMPHASIS: f64 = 1.1;

/// A run of prompt text at one weight. `BREAK` is a span of its own, `("BREAK", -1)`, as in A1111.
#[derive(Clone, Debug, PartialEq)]
pub struct Span {
    pub text: String,
    pub weight: f64,
}

impl Span {
    fn new(text: &str, weight: f64) -> Self {
        Self { text: text.to_string(), weight }
    }

    /// A `BREAK`: the rest of the prompt starts a new chunk. One inside brackets has had its
    /// weight multiplied and is read as the word "break", as A1111 reads it.
    pub fn is_break(&self) -> bool {
        self.text == "BREAK" && self.weight == -1.0
    }
}

/// One lexical token of the syntax, as A1111's `re_attention` splits a prompt.
enum Lexeme<'a> {
    /// `\(`, `\)`, `\[`, `\]`, `\\` (the character after the backslash), or a lone `\` (nothing).
    Escaped(&'a str),
    OpenRound,
    OpenSquare,
    /// `:1.3)`: its number as written, which may not parse (then it is text).
    WeightClose(&'a str),
    CloseRound,
    CloseSquare,
    /// A run without brackets, backslashes or colons, or a lone `:`.
    Text,
}

fn next_lexeme(s: &str) -> (Lexeme<'_>, usize) {
    let bytes = s.as_bytes();
    match bytes[0] {
        b'\\' => match bytes.get(1) {
            Some(b'(' | b')' | b'[' | b']' | b'\\') => (Lexeme::Escaped(&s[1..2]), 2),
            _ => (Lexeme::Escaped(""), 1),
        },
        b'(' => (Lexeme::OpenRound, 1),
        b'[' => (Lexeme::OpenSquare, 1),
        b')' => (Lexeme::CloseRound, 1),
        b']' => (Lexeme::CloseSquare, 1),
        b':' => {
            // `:` [+-]? [.0-9]+ `)`
            let sign = usize::from(matches!(bytes.get(1), Some(b'+' | b'-')));
            let digits = bytes[1 + sign..].iter().take_while(|b| b.is_ascii_digit() || **b == b'.').count();
            let end = 1 + sign + digits;
            if digits > 0 && bytes.get(end) == Some(&b')') {
                (Lexeme::WeightClose(&s[1..end]), end + 1)
            } else {
                (Lexeme::Text, 1)
            }
        }
        _ => {
            let len = s.find(['\\', '(', ')', '[', ']', ':']).unwrap_or(s.len());
            (Lexeme::Text, len)
        }
    }
}

/// Python's `\w`, for `BREAK`'s word boundaries.
fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Splits a text run at every `BREAK` standing as a word, eating the whitespace around it (A1111's
/// `\s*\bBREAK\b\s*`).
fn split_breaks(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut part_start, mut from) = (0, 0);
    while let Some(found) = text[from..].find("BREAK") {
        let at = from + found;
        let end = at + "BREAK".len();
        let before = text[..at].chars().next_back();
        let after = text[end..].chars().next();
        if before.is_some_and(is_word) || after.is_some_and(is_word) {
            from = at + 1;
            continue;
        }
        let start = part_start.max(text[..at].trim_end_matches(char::is_whitespace).len());
        parts.push(&text[part_start..start]);
        part_start = text.len() - text[end..].trim_start_matches(char::is_whitespace).len();
        from = part_start.max(end);
    }
    parts.push(&text[part_start..]);
    parts
}

/// A prompt as runs of text with their weights, by A1111's rules: brackets multiply everything
/// inside them when they close, unclosed brackets when the prompt ends (round ones first), a
/// bracket with nothing to close is text, neighbouring runs of equal weight are joined.
pub fn parse_prompt_attention(prompt: &str) -> Vec<Span> {
    let mut spans: Vec<Span> = Vec::new();
    let (mut round, mut square) = (Vec::new(), Vec::new());
    let multiply = |spans: &mut Vec<Span>, from: usize, by: f64| spans[from..].iter_mut().for_each(|s| s.weight *= by);
    let mut rest = prompt;
    while !rest.is_empty() {
        let (lexeme, len) = next_lexeme(rest);
        let raw = &rest[..len];
        rest = &rest[len..];
        match lexeme {
            Lexeme::Escaped(c) => spans.push(Span::new(c, 1.0)),
            Lexeme::OpenRound => round.push(spans.len()),
            Lexeme::OpenSquare => square.push(spans.len()),
            Lexeme::WeightClose(number) if !round.is_empty() && number.parse::<f64>().is_ok() => {
                let from = round.pop().expect("checked");
                multiply(&mut spans, from, number.parse().expect("checked"));
            }
            Lexeme::CloseRound if !round.is_empty() => {
                let from = round.pop().expect("checked");
                multiply(&mut spans, from, EMPHASIS);
            }
            Lexeme::CloseSquare if !square.is_empty() => {
                let from = square.pop().expect("checked");
                multiply(&mut spans, from, 1.0 / EMPHASIS);
            }
            _ => {
                for (i, part) in split_breaks(raw).into_iter().enumerate() {
                    if i > 0 {
                        spans.push(Span::new("BREAK", -1.0));
                    }
                    spans.push(Span::new(part, 1.0));
                }
            }
        }
    }
    for from in round {
        multiply(&mut spans, from, EMPHASIS);
    }
    for from in square {
        multiply(&mut spans, from, 1.0 / EMPHASIS);
    }
    let mut merged: Vec<Span> = Vec::with_capacity(spans.len());
    for span in spans {
        match merged.last_mut() {
            Some(last) if last.weight == span.weight => last.text.push_str(&span.text),
            _ => merged.push(span),
        }
    }
    if merged.is_empty() {
        merged.push(Span::new("", 1.0));
    }
    merged
}

/// One text-encoder input: 77 ids (start, 75 prompt or padding tokens, end, as the tokenizer
/// pads) and each token's weight.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptChunk {
    pub ids: Vec<u32>,
    pub weights: Vec<f64>,
}

impl PromptChunk {
    /// `body` (≤ 75 tokens) between the markers, then `pad_id`; the markers and padding weigh 1.
    fn new(body: &[u32], body_weights: &[f64], pad_id: u32) -> Self {
        let mut ids = Vec::with_capacity(CONTEXT_LENGTH);
        ids.push(START_OF_TEXT);
        ids.extend(body);
        ids.push(END_OF_TEXT);
        ids.resize(CONTEXT_LENGTH, pad_id);
        let mut weights = vec![1.0];
        weights.extend(body_weights);
        weights.resize(CONTEXT_LENGTH, 1.0);
        Self { ids, weights }
    }

    /// The empty prompt's chunk, which pads a shorter prompt of a batch to the longest's chunks.
    pub fn empty(pad_id: u32) -> Self {
        Self::new(&[], &[], pad_id)
    }

    pub fn is_emphasised(&self) -> bool {
        self.weights.iter().any(|&w| w != 1.0)
    }
}

/// A prompt as the text encoder reads it, A1111's way: its chunks, and its length in tokens as
/// A1111 counts it (75 for each chunk before the last, then the last one's prompt tokens).
#[derive(Clone, Debug, PartialEq)]
pub struct PromptTokens {
    pub chunks: Vec<PromptChunk>,
    pub token_count: usize,
}

impl PromptTokens {
    /// Parses `prompt` and cuts it into chunks with A1111's default comma backtrack.
    pub fn new(tokenizer: &ClipTokenizer, prompt: &str) -> Self {
        Self::with_backtrack(tokenizer, prompt, COMMA_BACKTRACK)
    }

    /// As `new`, ending a full chunk at a comma at most `backtrack` tokens back (0: never).
    pub fn with_backtrack(tokenizer: &ClipTokenizer, prompt: &str, backtrack: usize) -> Self {
        let pad = tokenizer.pad_id();
        let mut out = Self { chunks: Vec::new(), token_count: 0 };
        let (mut body, mut weights): (Vec<u32>, Vec<f64>) = (Vec::new(), Vec::new());
        // Where the last comma of the current chunk is.
        let mut comma: Option<usize> = None;
        let close = |out: &mut Self, body: &mut Vec<u32>, weights: &mut Vec<f64>, last: bool| {
            out.token_count += if last { body.len() } else { MAX_PROMPT_TOKENS };
            out.chunks.push(PromptChunk::new(body, weights, pad));
            body.clear();
            weights.clear();
        };
        for span in parse_prompt_attention(prompt) {
            if span.is_break() {
                close(&mut out, &mut body, &mut weights, false);
                comma = None;
                continue;
            }
            for token in tokenizer.tokens(&span.text) {
                if token == COMMA {
                    comma = Some(body.len());
                } else if let Some(at) = comma
                    && backtrack != 0
                    && body.len() == MAX_PROMPT_TOKENS
                    && body.len() - at <= backtrack
                {
                    // The words after the comma move to the next chunk whole.
                    let (moved, moved_weights) = (body.split_off(at + 1), weights.split_off(at + 1));
                    close(&mut out, &mut body, &mut weights, false);
                    comma = None;
                    body = moved;
                    weights = moved_weights;
                }
                if body.len() == MAX_PROMPT_TOKENS {
                    close(&mut out, &mut body, &mut weights, false);
                    comma = None;
                }
                body.push(token);
                weights.push(span.weight);
            }
        }
        if !body.is_empty() || out.chunks.is_empty() {
            close(&mut out, &mut body, &mut weights, true);
        }
        out
    }

    /// The tokens the chunks hold, 75 each: A1111's counter shows `token_count`/`capacity`.
    pub fn capacity(&self) -> usize {
        self.chunks.len() * MAX_PROMPT_TOKENS
    }

    /// Whether any token weighs other than 1 (then the encoder's output is reweighted).
    pub fn is_emphasised(&self) -> bool {
        self.chunks.iter().any(PromptChunk::is_emphasised)
    }
}

/// A1111's emphasis ("Original"): each token's hidden state times its weight, then each chunk
/// scaled back to the mean it had, so emphasis shifts attention between tokens without changing
/// the embedding's overall size. `z` (N, T, d), `weights` (N, T); the means in f32, since a
/// half-precision sum over 77·768 values would round badly.
pub fn apply_emphasis(z: &Tensor, weights: &Tensor) -> Result<Tensor> {
    let x = z.to_dtype(DType::F32)?;
    let mean = |t: &Tensor| t.flatten_from(1)?.mean_keepdim(D::Minus1)?.unsqueeze(2);
    let before = mean(&x)?;
    let weighted = x.broadcast_mul(&weights.to_dtype(DType::F32)?.unsqueeze(2)?)?;
    let after = mean(&weighted)?;
    Ok(weighted.broadcast_mul(&(before / after)?)?.to_dtype(z.dtype())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(prompt: &str) -> Vec<(String, f64)> {
        parse_prompt_attention(prompt).into_iter().map(|s| (s.text, s.weight)).collect()
    }

    fn spans(expected: &[(&str, f64)]) -> Vec<(String, f64)> {
        expected.iter().map(|&(t, w)| (t.to_string(), w)).collect()
    }

    /// The examples of A1111's `parse_prompt_attention` docstring, with its numbers (exact f64).
    #[test]
    fn parses_a1111_docstring_examples() {
        assert_eq!(parsed("normal text"), spans(&[("normal text", 1.0)]));
        assert_eq!(parsed("an (important) word"), spans(&[("an ", 1.0), ("important", 1.1), (" word", 1.0)]));
        assert_eq!(parsed("(unbalanced"), spans(&[("unbalanced", 1.1)]));
        assert_eq!(parsed(r"\(literal\]"), spans(&[("(literal]", 1.0)]));
        assert_eq!(parsed("(unnecessary)(parens)"), spans(&[("unnecessaryparens", 1.1)]));
        assert_eq!(
            parsed("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."),
            spans(&[
                ("a ", 1.0),
                ("house", 1.5730000000000004),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641000000000006),
                (".", 1.1),
            ])
        );
    }

    /// The rest of the syntax, each value worked out by hand from A1111's rules.
    #[test]
    fn parses_brackets_escapes_and_breaks() {
        assert_eq!(parsed(""), spans(&[("", 1.0)]));
        assert_eq!(parsed("[a]"), spans(&[("a", 1.0 / 1.1)]));
        // Nothing to close: the bracket is text.
        assert_eq!(parsed("a) b] (c:2)x"), spans(&[("a) b] ", 1.0), ("c", 2.0), ("x", 1.0)]));
        assert_eq!(parsed("a:1.5) b"), spans(&[("a:1.5) b", 1.0)]));
        assert_eq!(parsed("(a:-.5)"), spans(&[("a", -0.5)]));
        // A weight that is no number stays text, inside the still-open bracket (A1111 stops with
        // an error there).
        assert_eq!(parsed("(a:1.2.3)"), spans(&[("a:1.2.3)", 1.1)]));
        // Unclosed: round brackets first, then square ones (the other order rounds differently:
        // 1.2100000000000002).
        assert_eq!(parsed("[(((a"), spans(&[("a", 1.2100000000000004)]));
        assert_eq!(parsed(r"a \\ b \ c \:"), spans(&[(r"a \ b  c :", 1.0)]));
        assert_eq!(
            parsed("a BREAK b\tBREAK\nc BREAKFAST xBREAK"),
            spans(&[("a", 1.0), ("BREAK", -1.0), ("b", 1.0), ("BREAK", -1.0), ("c BREAKFAST xBREAK", 1.0)])
        );
        assert_eq!(parsed("BREAK"), spans(&[("", 1.0), ("BREAK", -1.0), ("", 1.0)]));
        // Inside brackets BREAK is multiplied too and is no longer a break.
        let inside = parse_prompt_attention("(a BREAK b)");
        assert_eq!(inside[1].text, "BREAK");
        assert!(!inside[1].is_break());
        assert_eq!(parsed("é (ü) BREAK"), spans(&[("é ", 1.0), ("ü", 1.1), ("", 1.0), ("BREAK", -1.0), ("", 1.0)]));
    }

    #[test]
    fn chunks_follow_a1111() {
        let tok = ClipTokenizer::new();
        assert_eq!(tok.tokens(","), vec![COMMA]);
        // A plain short prompt is today's 77 ids, all weighing 1.
        let plain = PromptTokens::new(&tok, "a red circle, sks style");
        assert_eq!(plain.chunks.len(), 1);
        assert_eq!(plain.chunks[0].ids, tok.encode("a red circle, sks style"));
        assert!(!plain.is_emphasised());
        assert_eq!(plain.token_count, tok.count_tokens("a red circle, sks style"));
        let empty = PromptTokens::new(&tok, "");
        assert_eq!(empty.chunks, vec![PromptChunk::empty(END_OF_TEXT)]);
        assert_eq!(empty.chunks[0].ids, tok.encode(""));
        // SD 2.x pads after the end marker with its own id.
        let sd2 = ClipTokenizer::with_pad_id(0);
        assert_eq!(PromptTokens::new(&sd2, "(red)").chunks[0].ids, sd2.encode("red"));
        assert_eq!(PromptTokens::new(&sd2, "(red)").chunks[0].weights[..3], [1.0, 1.1, 1.0]);

        // 70 words, a comma, 10 words: the chunk fills 4 tokens after the comma, so those 4 move.
        let red = "red ".repeat(70);
        let long = format!("{red}, {}", "blue ".repeat(10));
        let t = PromptTokens::new(&tok, &long);
        assert_eq!(t.chunks.len(), 2);
        assert_eq!(t.chunks[0].ids[71], COMMA);
        assert_eq!(&t.chunks[0].ids[72..], &[END_OF_TEXT; 5]);
        assert_eq!(t.chunks[1].ids[1..11], [tok.tokens("blue")[0]; 10]);
        assert_eq!((t.token_count, t.capacity()), (75 + 10, 150));
        // Without backtrack the first chunk is full.
        let t = PromptTokens::with_backtrack(&tok, &long, 0);
        assert_eq!(t.chunks[0].ids[75], tok.tokens("blue")[0]);
        // A comma further back than the backtrack does not cut.
        let far = format!("{}, {}", "red ".repeat(50), "blue ".repeat(40));
        let t = PromptTokens::new(&tok, &far);
        assert_eq!(t.chunks[0].ids[75], tok.tokens("blue")[0]);
        // BREAK closes the chunk; one at the start leaves an empty chunk before it.
        let t = PromptTokens::new(&tok, "a BREAK (b)");
        assert_eq!(t.chunks.len(), 2);
        assert_eq!(t.chunks[0].ids, tok.encode("a"));
        assert_eq!(t.chunks[1].ids, tok.encode("b"));
        assert_eq!(t.chunks[1].weights[1], 1.1);
        assert_eq!(t.token_count, 75 + 1);
        assert_eq!(PromptTokens::new(&tok, "BREAK a").chunks[0], PromptChunk::empty(END_OF_TEXT));
        // Exactly 75 tokens is one chunk, 76 two.
        assert_eq!(PromptTokens::new(&tok, &"red ".repeat(75)).chunks.len(), 1);
        assert_eq!(PromptTokens::new(&tok, &"red ".repeat(76)).chunks.len(), 2);
    }
}
