"""One decoder for Llama (and Mistral-style), Qwen2 (q/k/v bias) and Qwen3 (per-head q/k RMSNorm).

Pipeline stages: the model builds only the layers in `get_state().stage_layers` (global indices
[first, last)); the first stage owns the embedding, the last the final norm and the LM head.

    forward(input_ids, positions, ctx, hidden=None, residual=None)
      first stage: embeds input_ids (hidden/residual ignored); later stages: run on the received
      (hidden, residual). The last stage returns the normed hidden [T, H]; other stages return
      (hidden, residual), both [T, H], to send to the next stage.

`ctx.attend_rotary(layer, ...)` gets the LOCAL layer index (global index minus the stage's first layer),
so each stage's KV cache holds only its own layers, numbered from 0.
"""

from __future__ import annotations

import torch
from torch import nn

from nanoslg.core.dist import get_state
from nanoslg.core.registry import ARCHITECTURES
from nanoslg.model.hf_config import ModelArgs
from nanoslg.model.layers import (
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, local_idx: int, rotary_emb: RotaryEmbedding, quant=None):
        super().__init__()
        self.local_idx = local_idx
        d = args.head_dim
        self.qkv_proj = QKVParallelLinear(
            args.hidden_size, d, args.num_heads, args.num_kv_heads, args.attention_bias, quant=quant
        )
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size, self.kv_size = self.num_heads * d, self.num_kv_heads * d
        self.o_proj = RowParallelLinear(args.num_heads * d, args.hidden_size, args.o_bias, quant=quant)
        # An FP8 KV cache stores k / k_scale and v / v_scale: per-layer scales some FP8 checkpoints carry
        # (loaded when present, else 1.0). The cache backend reads them once at start-up.
        self.register_buffer("k_scale", torch.ones((), dtype=torch.float32), persistent=False)
        self.register_buffer("v_scale", torch.ones((), dtype=torch.float32), persistent=False)
        self.rotary_emb = rotary_emb  # one cos/sin cache shared by all layers
        self.q_norm = RMSNorm(d, args.rms_norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(d, args.rms_norm_eps) if args.qk_norm else None

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [T, Hq, D], k and v [T, Hkv, D] (k, v may be strided views: backends take them as is)."""
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k, v = q.view(t, self.num_heads, -1), k.view(t, self.num_kv_heads, -1), v.view(t, self.num_kv_heads, -1)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def attend(self, positions: torch.Tensor, q, k, v, ctx) -> torch.Tensor:
        """Rotary, then attention: [T, Hq * D], the o projection's input."""
        o = ctx.attend_rotary(self.local_idx, q, k, v, positions, self.rotary_emb)
        return o.reshape(q.shape[0], -1)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, ctx) -> torch.Tensor:
        return self.o_proj(self.attend(positions, *self.project(x), ctx))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs, quant=None):
        super().__init__()
        inter = args.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(args.hidden_size, [inter, inter], args.mlp_bias, quant=quant)
        self.down_proj = RowParallelLinear(inter, args.hidden_size, args.mlp_bias, quant=quant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        quant = self.down_proj.quant  # the whole MLP in the method's own kernels, where it has them for x
        y = None if quant is None else quant.apply_mlp(self.gate_up_proj, self.down_proj, x)
        if y is not None:
            return self.down_proj.reduce(y)
        return self.down_proj.forward_silu_mul(self.gate_up_proj(x))  # silu(gate) * up, then down


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, local_idx: int, rotary_emb: RotaryEmbedding, quant=None):
        super().__init__()
        self.self_attn = Attention(args, local_idx, rotary_emb, quant)
        self.mlp = MLP(args, quant)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def before_attention(self, hidden, residual):
        """The input norm and the q, k, v projections: ((q, k, v), residual)."""
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        return self.self_attn.project(hidden), residual

    def after_attention(self, o: torch.Tensor, residual: torch.Tensor):
        """The o projection, the post-attention norm and the MLP: (hidden, residual)."""
        hidden, residual = self.post_attention_layernorm(self.self_attn.o_proj(o), residual)
        return self.mlp(hidden), residual

    def forward(self, positions, hidden, residual, ctx):
        qkv, residual = self.before_attention(hidden, residual)
        o = self.self_attn.attend(positions, *qkv, ctx)
        del qkv  # freed before the MLP's activations are allocated: the step's activation peak
        return self.after_attention(o, residual)


class DecoderModel(nn.Module):
    def __init__(self, args: ModelArgs, first: int, last: int, is_first: bool, is_last: bool, quant=None):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(args.vocab_size, args.hidden_size) if is_first else None
        rope = RotaryEmbedding(args.head_dim, args.max_position_embeddings, args.rope_theta, args.rope_scaling)
        # Keyed by GLOBAL index so checkpoint names map directly; attention gets the local index.
        self.layers = nn.ModuleDict({str(i): DecoderLayer(args, i - first, rope, quant) for i in range(first, last)})
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps) if is_last else None


class LlamaForCausalLM(nn.Module):
    def __init__(self, args: ModelArgs, quant=None):
        """quant: a nanoslg.model.quant method for the decoder's linear layers, or None."""
        super().__init__()
        st = get_state()
        first, last = st.stage_layers
        last = args.num_layers if last == -1 else last
        self.args = args
        self.quant = quant
        self.first_layer, self.last_layer = first, last
        self.model = DecoderModel(args, first, last, st.is_first_stage, st.is_last_stage, quant)
        self.lm_head = ParallelLMHead(args.vocab_size, args.hidden_size) if st.is_last_stage else None
        if self.lm_head is not None and args.tie_word_embeddings and self.model.embed_tokens is not None:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        ctx,
        hidden: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
    ):
        m = self.model
        if m.embed_tokens is not None:
            hidden, residual = m.embed_tokens(input_ids), None
        for layer in m.layers.values():
            hidden, residual = layer(positions, hidden, residual, ctx)
        if m.norm is None:
            return hidden, (residual if residual is not None else torch.zeros_like(hidden))
        if residual is None:  # a last stage without layers
            return m.norm(hidden)
        return m.norm(hidden, residual)[0]

    def piece(self, i: int, input_ids: torch.Tensor, o: torch.Tensor, residual: torch.Tensor | None):
        """Piece i of a one-stage forward cut at its attention calls (runtime/piecewise.py captures
        each in a CUDA graph): piece 0 embeds input_ids and projects layer 0's q, k, v; piece i
        finishes layer i - 1 from its attention output o [T, Hq * D] and projects layer i's; the
        last finishes the last layer and norms. Returns ((q, k, v), residual), or (None, hidden)
        from the last."""
        layers, m = self.decoder_layers, self.model
        if i == 0:
            hidden, residual = m.embed_tokens(input_ids), None
        else:
            hidden, residual = layers[i - 1].after_attention(o, residual)
        if i < len(layers):
            return layers[i].before_attention(hidden, residual)
        return None, m.norm(hidden, residual)[0]

    @property
    def decoder_layers(self) -> list[DecoderLayer]:
        return list(self.model.layers.values())

    def kv_scales(self) -> list[tuple[float, float]]:
        """Per local layer, the (k, v) scales of an FP8 KV cache."""
        return [(float(m.self_attn.k_scale), float(m.self_attn.v_scale)) for m in self.model.layers.values()]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, H] (rows to sample) -> logits [B, vocab] in the model's dtype."""
        return self.lm_head(hidden)


ARCHITECTURES.register("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")(
    LlamaForCausalLM
)
