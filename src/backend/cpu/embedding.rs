//! Embeddings: the sum of the word, position and token-type tables.
//!
//! Forward:  `out[r, :] = word[ids[r], :] + position[positions[r], :] + token_type[type_ids[r], :]`
//! Backward: each table's gradient gets `dout[r, :]` added at the row that was read, except the
//!           word row `padding_idx`, which `nn.Embedding(padding_idx=…)` never updates.
//! Tables are `[entries, hidden]`, `out` is `[rows, hidden]`, indices one per row.

use rayon::prelude::*;

#[allow(clippy::too_many_arguments)]
pub fn embeddings_forward(
    out: &mut [f32],
    word: &[f32],
    position: &[f32],
    token_type: &[f32],
    ids: &[u32],
    positions: &[u32],
    type_ids: &[u32],
    hidden: usize,
) {
    let rows = ids.len();
    assert_eq!(
        (out.len(), positions.len(), type_ids.len()),
        (rows * hidden, rows, rows)
    );
    fn row(table: &[f32], i: u32, hidden: usize) -> &[f32] {
        let i = i as usize;
        assert!(
            (i + 1) * hidden <= table.len(),
            "embedding index {i} out of range"
        );
        &table[i * hidden..(i + 1) * hidden]
    }
    out.par_chunks_mut(hidden).enumerate().for_each(|(r, o)| {
        let (w, p, t) = (
            row(word, ids[r], hidden),
            row(position, positions[r], hidden),
            row(token_type, type_ids[r], hidden),
        );
        for c in 0..hidden {
            o[c] = w[c] + p[c] + t[c];
        }
    });
}

#[allow(clippy::too_many_arguments)]
pub fn embeddings_backward(
    dword: &mut [f32],
    dposition: &mut [f32],
    dtoken_type: &mut [f32],
    dout: &[f32],
    ids: &[u32],
    positions: &[u32],
    type_ids: &[u32],
    hidden: usize,
    padding_idx: Option<u32>,
) {
    let rows = ids.len();
    assert_eq!(
        (dout.len(), positions.len(), type_ids.len()),
        (rows * hidden, rows, rows)
    );
    let add_row = |table: &mut [f32], i: u32, g: &[f32]| {
        let i = i as usize;
        table[i * hidden..(i + 1) * hidden]
            .iter_mut()
            .zip(g)
            .for_each(|(t, g)| *t += g);
    };
    for (r, g) in dout.chunks(hidden).enumerate() {
        if Some(ids[r]) != padding_idx {
            add_row(dword, ids[r], g);
        }
        add_row(dposition, positions[r], g);
        add_row(dtoken_type, type_ids[r], g);
    }
}
