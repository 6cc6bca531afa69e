"""Worker script: a tiny megatron-core GPT trained 2 steps under the megammr runtime.

Run under torchrun by tests/dist/test_parallel_equivalence.py. Environment:
  TP, PP        parallel sizes (world size = TP * PP * DP)
  LOAD=dir      load this torch_dist checkpoint before training (weights then equal any layout's)
  SAVE0=dir     save right after initialisation;  SAVE=dir  save after training
  STEPS         optimizer steps (default 2)
Prints one line `RESULT {json}` from the rank that holds the loss (last stage, tp rank 0):
losses and grad norms per step and an eval loss after training.
"""
import json
import os

import torch


def save(model, path):
    from megatron.core import dist_checkpointing
    os.makedirs(path, exist_ok=True)  # every rank: the directory is shared and must exist before save
    torch.distributed.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), path)


def main():
    from megammr.config import load_recipe
    from megammr import runtime

    tp, pp = int(os.environ.get("TP", 1)), int(os.environ.get("PP", 1))
    steps = int(os.environ.get("STEPS", 2))
    recipe = load_recipe(None, [f"parallel.tp={tp}", f"parallel.pp={pp}", "train.seed=1234"])
    rt = runtime.init(recipe)
    torch.set_num_threads(1)

    from megatron.core import dist_checkpointing, parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.transformer_config import TransformerConfig

    vocab, seq, rows, nmb = 96, 16, 4, 4  # rows: sequences per micro-batch over all DP ranks
    cfg = TransformerConfig(
        num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        add_bias_linear=False, add_qkv_bias=True, hidden_dropout=0.0, attention_dropout=0.0,
        use_cpu_initialization=True, params_dtype=torch.float32, pipeline_dtype=torch.float32,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
    )
    model = GPTModel(
        config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=False),
        vocab_size=vocab, max_sequence_length=seq, position_embedding_type="rope",
        share_embeddings_and_output_weights=os.environ.get("TIED") == "1",
        pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
    )
    if os.environ.get("LOAD"):
        state = dist_checkpointing.load(model.sharded_state_dict(), os.environ["LOAD"])
        model.load_state_dict(state, strict=True)
    if os.environ.get("SAVE0"):
        save(model, os.environ["SAVE0"])

    ddp = DistributedDataParallel(config=cfg, ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True),
                                  module=model)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=0.5, bf16=False), [ddp])
    cfg.finalize_model_grads_func = finalize_model_grads
    cfg.no_sync_func = ddp.no_sync

    # The same global batch on every layout; each DP rank takes its slice of every micro-batch.
    g = torch.Generator().manual_seed(0)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    mbs = rows // dp
    tokens = torch.randint(0, vocab, (nmb, rows, seq + 1), generator=g)
    batches = [dict(tokens=t[dp_rank * mbs:(dp_rank + 1) * mbs, :-1], labels=t[dp_rank * mbs:(dp_rank + 1) * mbs, 1:])
               for t in tokens]
    pos = torch.arange(seq).expand(mbs, seq)

    def forward_step(it, m):
        b = next(it)
        out = m(input_ids=b["tokens"], position_ids=pos, attention_mask=None, labels=b["labels"])
        return out, lambda o: (o.float().mean(), {"loss": o.float().mean().detach()})

    fb = get_forward_backward_func()

    def run(forward_only):
        out = fb(forward_step_func=forward_step, data_iterator=iter(batches), model=[ddp], num_microbatches=nmb,
                 seq_length=seq, micro_batch_size=mbs, forward_only=forward_only)
        if not ps.is_pipeline_last_stage():
            return None
        loss = torch.stack([o["loss"] for o in out]).mean()
        torch.distributed.all_reduce(loss, group=ps.get_data_parallel_group())
        return float(loss) / dp

    losses, norms = [], []
    for _ in range(steps):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        losses.append(run(False))
        ok, gnorm, _ = opt.step()
        assert ok
        norms.append(float(gnorm))
    eval_loss = run(True)
    if os.environ.get("SAVE"):
        save(model, os.environ["SAVE"])
    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0 and dp_rank == 0:
        print("RESULT " + json.dumps(dict(losses=losses, grad_norms=norms, eval_loss=eval_loss,
                                          cpu_patches=rt.cpu_patches, world=rt.env.world_size,
                                          launcher=rt.env.launcher)), flush=True)
    runtime.shutdown()


if __name__ == "__main__":  # torch_dist saving spawns a multiprocessing Manager: keep the guard
    main()
