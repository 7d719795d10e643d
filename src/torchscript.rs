//! What a TorchScript file declares about `forward`, read without libtorch:
//! the file is a zip whose `data.pkl` names the top-level class and whose
//! `code/` entries hold that class's Python-like source, with
//! `def forward(self, x: Tensor, ...) -> Tuple[Tensor, Tensor]:`.
//!
//! libtorch (and tch) expose no method schema, so this is how a model served
//! without a warm-up shape still lists its inputs and outputs. Every read is
//! bounded: the pickle's first bytes, and one code entry of at most
//! [`MAX_CODE_BYTES`]. A file this does not understand declares nothing.

use std::io::{Read, Seek};

/// Longest code entry read, in bytes (decompressed).
pub const MAX_CODE_BYTES: u64 = 4 << 20;
/// Bytes of `data.pkl` read: its first opcodes name the class.
const PICKLE_HEAD_BYTES: u64 = 4096;

/// One parameter of `forward` after `self`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Param {
    pub name: String,
    /// Its annotation as written: `Tensor`, `List[Tensor]`, `int`, ...
    pub annotation: String,
}

/// `forward`'s parameters (without `self`) and the annotation of what it returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    pub params: Vec<Param>,
    pub returns: String,
}

impl Forward {
    /// The leading parameters that are tensors: what a request can send, in
    /// order (a `past: List[Tensor]` after them is the KV signature's cache).
    pub fn tensor_inputs(&self) -> usize {
        self.params
            .iter()
            .take_while(|p| is_tensor(&p.annotation))
            .count()
    }

    /// The leading tensors of the result: 1 for `Tensor`, N for a tuple of N
    /// tensors, the tensors before the first other element otherwise
    /// (`Tuple[Tensor, List[Tensor]]`: 1); at least 1.
    pub fn tensor_outputs(&self) -> usize {
        let r = self.returns.trim();
        let n = match r.strip_prefix("Tuple[").and_then(|t| t.strip_suffix(']')) {
            Some(items) => split_top(items).iter().take_while(|t| is_tensor(t)).count(),
            None => usize::from(is_tensor(r)),
        };
        n.max(1)
    }
}

fn is_tensor(annotation: &str) -> bool {
    annotation.trim() == "Tensor"
}

/// Reads `forward`'s declaration of the top-level module of a TorchScript
/// file. None when the file is not such a zip or the declaration is not found.
pub fn read_forward<R: Read + Seek>(file: R) -> Option<Forward> {
    let mut zip = zip::ZipArchive::new(file).ok()?;
    // The archive's one top-level directory: `NAME/data.pkl`.
    let pkl = zip.file_names().find_map(|name| {
        let (root, rest) = name.split_once('/')?;
        (rest == "data.pkl").then(|| root.to_string())
    })?;
    let mut head = Vec::new();
    zip.by_name(&format!("{pkl}/data.pkl"))
        .ok()?
        .take(PICKLE_HEAD_BYTES)
        .read_to_end(&mut head)
        .ok()?;
    let (module, class) = pickled_class(&head)?;
    let path = format!("{pkl}/code/{}.py", module.replace('.', "/"));
    let entry = zip.by_name(&path).ok()?;
    if entry.size() > MAX_CODE_BYTES {
        return None;
    }
    let mut code = String::new();
    entry.take(MAX_CODE_BYTES).read_to_string(&mut code).ok()?;
    forward_of(&code, &class)
}

/// The class of the object a pickle (protocol 2, as torch.jit.save writes
/// it) starts with: `\x80\x02c<module>\n<class>\n`.
fn pickled_class(head: &[u8]) -> Option<(String, String)> {
    let rest = head.strip_prefix(b"\x80\x02c")?;
    let mut lines = rest.splitn(3, |&b| b == b'\n');
    let module = std::str::from_utf8(lines.next()?).ok()?;
    let class = std::str::from_utf8(lines.next()?).ok()?;
    let ident = |s: &str| {
        !s.is_empty()
            && s.len() <= 256
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
    };
    (ident(module) && ident(class) && module.starts_with("__torch__"))
        .then(|| (module.to_string(), class.to_string()))
}

/// `forward`'s declaration inside `class CLASS(...)` of a code entry.
pub fn forward_of(code: &str, class: &str) -> Option<Forward> {
    let header = format!("class {class}(");
    let start = code
        .lines()
        .scan(0usize, |at, line| {
            let here = *at;
            *at += line.len() + 1;
            Some((here, line))
        })
        .find(|(_, line)| line.starts_with(&header))
        .map(|(at, _)| at)?;
    let body = &code[start..];
    // The class ends where the next top-level statement starts.
    let end = body[1..].find("\nclass ").map_or(body.len(), |i| i + 1);
    let body = &body[..end];
    let def = body.find("\n  def forward(")? + "\n  def forward(".len();
    let sig = &body[def..];
    // The parameter list: up to the parenthesis that closes it.
    let mut depth = 0usize;
    let close = sig.char_indices().find_map(|(i, c)| match c {
        '(' | '[' => {
            depth += 1;
            None
        }
        ']' => {
            depth = depth.saturating_sub(1);
            None
        }
        ')' if depth == 0 => Some(i),
        ')' => {
            depth -= 1;
            None
        }
        _ => None,
    })?;
    let params_text = &sig[..close];
    let after = sig[close + 1..].trim_start();
    let returns = after
        .strip_prefix("->")
        .and_then(|r| r.split_once(":\n").map(|(t, _)| t.trim().to_string()))
        .unwrap_or_else(|| "Tensor".to_string());
    let mut params = Vec::new();
    for (i, p) in split_top(params_text).into_iter().enumerate() {
        let p = p.trim();
        if p.is_empty() {
            continue;
        }
        let (name, annotation) = p.split_once(':').unwrap_or((p, "Tensor"));
        let name = name.trim();
        if i == 0 && name == "self" {
            continue;
        }
        // A default (`x: Optional[Tensor]=None`) is not part of the type.
        let annotation = annotation.split('=').next().unwrap_or("").trim();
        params.push(Param {
            name: name.to_string(),
            annotation: annotation.to_string(),
        });
    }
    Some(Forward { params, returns })
}

/// Splits at the commas outside brackets.
fn split_top(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut from) = (0usize, 0usize);
    for (i, c) in text.char_indices() {
        match c {
            '[' | '(' => depth += 1,
            ']' | ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                out.push(&text[from..i]);
                from = i + 1;
            }
            _ => {}
        }
    }
    out.push(&text[from..]);
    out.into_iter().filter(|s| !s.trim().is_empty()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADDMUL: &str = "class AddMul(Module):
  __parameters__ = []
  training : bool
  def forward(self: __torch__.AddMul,
    a: Tensor,
    b: Tensor) -> Tuple[Tensor, Tensor]:
    return (torch.add(a, b), torch.mul(a, b))
";

    #[test]
    fn forward_declarations_are_read_from_the_class_source() {
        let f = forward_of(ADDMUL, "AddMul").unwrap();
        assert_eq!(
            f.params.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!((f.tensor_inputs(), f.tensor_outputs()), (2, 2));
        // The KV signature: the cache is not a request tensor.
        let kv = "class Top(Module):
  def forward(self: __torch__.Top,
    hidden: Tensor,
    past: List[Tensor]) -> Tuple[Tensor, List[Tensor]]:
    return (hidden, past)
class Inner(Module):
  def forward(self: __torch__.Inner,
    a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    return a
";
        let f = forward_of(kv, "Top").unwrap();
        assert_eq!((f.tensor_inputs(), f.tensor_outputs()), (1, 1));
        let f = forward_of(kv, "Inner").unwrap();
        assert_eq!((f.tensor_inputs(), f.tensor_outputs()), (3, 1));
        assert!(forward_of(kv, "Missing").is_none());
        assert!(forward_of("class X(Module):\n  x : int\n", "X").is_none());
    }

    #[test]
    fn the_pickle_names_the_top_level_class() {
        assert_eq!(
            pickled_class(b"\x80\x02c__torch__.torch.nn.modules.container\nSequential\nq\x00)"),
            Some((
                "__torch__.torch.nn.modules.container".into(),
                "Sequential".into()
            ))
        );
        assert_eq!(pickled_class(b"\x80\x02cos\nsystem\n"), None);
        assert_eq!(pickled_class(b"PK\x03\x04"), None);
    }

    #[test]
    fn generated_fixtures_declare_their_forward() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/generated");
        let read = |name: &str| {
            std::fs::File::open(format!("{dir}/{name}"))
                .ok()
                .and_then(read_forward)
        };
        // Fixtures are made by `make fixtures`; without them there is nothing to read.
        if let Some(f) = read("addmul.pt") {
            assert_eq!((f.tensor_inputs(), f.tensor_outputs()), (2, 2));
        }
        if let Some(f) = read("mlp.pt") {
            assert_eq!((f.tensor_inputs(), f.tensor_outputs()), (1, 1));
        }
        if let Some(f) = read("attn_kv.pt") {
            assert_eq!(f.params[1].annotation, "List[Tensor]");
            assert_eq!((f.tensor_inputs(), f.tensor_outputs()), (1, 1));
        }
        // Not a zip at all.
        assert!(read_forward(std::io::Cursor::new(b"not a zip".to_vec())).is_none());
    }
}
