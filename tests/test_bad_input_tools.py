"""Every bad or damaged input to the tools that do not train (compare, sample, eval, export, coord_check, and the
Hugging Face loader behind `hf=`): one `error:` line naming the problem and the fix, exit code 2, no traceback,
and the user's folder exactly as it was (nothing deleted or overwritten, nothing half-written left behind)."""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

from gpt_exp import compare, coord_check, export, hf
from gpt_exp import eval as evals
from gpt_exp import sample
from gpt_exp.cli import _command_name, command, user_error_line
from gpt_exp.checkpoint import load_model, save_checkpoint
from gpt_exp.hf import SAFETENSORS, load_hf_gpt2, read_safetensors, save_hf_gpt2, write_safetensors
from gpt_exp.model import GPT, GPTConfig
from tests.helpers import cli_env, run_cli
from tests.test_core import MC, SCHEMA, write_bundle

MAINS = {"compare": compare.main, "sample": sample.main, "eval": evals.main, "export": export.main,
         "coord_check": coord_check.main}
TINY = dict(block_size=32, vocab_size=50257, n_layer=1, n_head=2, n_embd=8)
EXAMPLE = {"ctx": "A man is sitting on a roof. he", "label": 3,
           "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                       "is holding a rubik's cube.", "starts pulling up roofing on a roof."]}
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
CKPT = "{tmp}/run/checkpoints/step_0000002.pt"
HELLASWAG = "path={tmp}/hellaswag.jsonl"
CORE_FIX = "give the DCLM eval bundle's dir (core.yaml, eval_meta_data.csv, eval_data/)"

# (case, tool, arguments, the error line's expected text, how: "main" in-process or "cli" as a subprocess);
# {tmp} is the fixture's folder, where every input below is built.
CASES = [
    # compare: damaged run files
    ("compare broken middle line", "compare", ["{tmp}/runs/broken_middle"],
     "error: {tmp}/runs/broken_middle/metrics.jsonl line 2 is not JSON; repair or delete that line", "main"),
    ("compare binary metrics", "compare", ["{tmp}/runs/binary"],
     "error: {tmp}/runs/binary/metrics.jsonl line 1 is not JSON; repair or delete that line", "main"),
    ("compare row without step", "compare", ["{tmp}/runs/no_step"],
     "error: {tmp}/runs/no_step/metrics.jsonl line 1 is not a metrics row (step=None is not an integer); "
     "repair or delete that line", "main"),
    ("compare non-numeric loss", "compare", ["{tmp}/runs/text_loss"],
     "error: {tmp}/runs/text_loss/metrics.jsonl line 2 is not a metrics row (loss='low' is not a number)", "main"),
    ("compare row is a list", "compare", ["{tmp}/runs/list_row"],
     "error: {tmp}/runs/list_row/metrics.jsonl line 1 is not a metrics row (a JSON list, not an object)", "main"),
    ("compare summary not JSON", "compare", ["{tmp}/runs/summary_text"],
     "error: {tmp}/runs/summary_text/summary.json is not JSON; delete it to show the run as incomplete", "main"),
    ("compare summary a list", "compare", ["{tmp}/runs/summary_list"],
     "error: {tmp}/runs/summary_list/summary.json is not a run summary (a JSON list, not an object); delete it",
     "main"),
    ("compare summary text number", "compare", ["{tmp}/runs/summary_value"],
     "error: {tmp}/runs/summary_value/summary.json: final_loss='low' is not a number; delete it", "main"),
    ("compare config damaged", "compare", ["{tmp}/runs/config_broken"],
     "error: {tmp}/runs/config_broken/.hydra/config.yaml is not valid YAML (ParserError); repair it, or leave "
     "the run out of the comparison", "main"),
    ("compare config a list", "compare", ["{tmp}/runs/config_list"],
     "error: {tmp}/runs/config_list/.hydra/config.yaml is not a run config (a YAML mapping of settings)", "main"),
    ("compare config missing", "compare", ["{tmp}/runs/config_missing"],
     "error: no runs under {tmp}/runs/config_missing (a run dir holds .hydra/config.yaml); pass a dir from outputs/",
     "main"),
    ("compare metrics is a dir", "compare", ["{tmp}/runs/metrics_dir"],
     "error: cannot read {tmp}/runs/metrics_dir/metrics.jsonl (Is a directory); check the path", "main"),
    # compare: paths and options
    ("compare glob matches nothing", "compare", ["{tmp}/runs/nothing_*"],
     "error: {tmp}/runs/nothing_* does not exist; pass a run dir or a sweep dir", "main"),
    ("compare path is a file", "compare", ["{tmp}/notes.txt"],
     "error: {tmp}/notes.txt is a file, not a run dir; pass a run dir (outputs/DATE/TIME) or a sweep dir", "main"),
    ("compare sweep without jobs", "compare", ["{tmp}/empty_sweep"],
     "error: no runs under {tmp}/empty_sweep (a run dir holds .hydra/config.yaml)", "main"),
    ("compare out under a file", "compare", ["{tmp}/run", "--out", "{tmp}/notes.txt/report"],
     "error: cannot write compare.csv, compare.json, compare.png to {tmp}/notes.txt/report (Not a directory); "
     "pass --out DIR", "main"),
    ("compare out is a file", "compare", ["{tmp}/run", "--out", "{tmp}/notes.txt"],
     "error: --out {tmp}/notes.txt is a file; give a dir", "main"),
    ("compare unknown metric", "compare", ["{tmp}/run", "--out", "{tmp}/report", "--metric", "accuracy"],
     "error: unknown --metric accuracy; choose one of final_loss", "main"),
    ("compare smooth zero", "compare", ["{tmp}/run", "--smooth", "0"],
     "error: --smooth 0 must be at least 1 (1 means no smoothing)", "main"),
    ("compare smooth not a number", "compare", ["{tmp}/run", "--smooth", "x"],
     "error: argument --smooth: invalid int value: 'x'; `python -m gpt_exp.compare --help` lists", "main"),
    pytest.param("compare unreadable dir", "compare", ["{tmp}/unreadable"],
                 "error: cannot read {tmp}/unreadable (permission denied); fix its permissions", "main",
                 marks=pytest.mark.skipif(IS_ROOT, reason="root reads every dir")),
    ("compare glob matches no run", "compare", ["{tmp}/notes*"],
     "error: {tmp}/notes* matches no run dir (a run dir holds .hydra/config.yaml); pass run or sweep dirs", "main"),
    ("compare effect without baseline", "compare", ["{tmp}/run", "--effect", "0.1"],
     "error: --effect sizes the seeds of --baseline's test; add --baseline KEY=VALUE", "main"),
    ("compare effect not positive", "compare", ["{tmp}/run", "--baseline", "optim.lr=1e-3", "--effect", "-1"],
     "error: --effect -1.0 must be a positive difference in the metric, e.g. --effect 0.02", "main"),
    ("compare CLI broken middle line", "compare", ["{tmp}/runs/broken_middle"],
     "error: {tmp}/runs/broken_middle/metrics.jsonl line 2 is not JSON", "cli"),
    # the Hugging Face loader (sample hf=, eval hf=, export of a HF dir)
    ("hf partial sharded download", "sample", ["hf={tmp}/hf_partial"],
     "error: {tmp}/hf_partial is a partial download: 1 of the 2 shards that model.safetensors.index.json names "
     "are missing (e.g. model-00002-of-00002.safetensors); download them again", "main"),
    ("hf index not JSON", "sample", ["hf={tmp}/hf_index_text"],
     "error: {tmp}/hf_index_text/model.safetensors.index.json cannot be read (JSONDecodeError", "main"),
    ("hf config not JSON", "sample", ["hf={tmp}/hf_config_text"],
     "error: {tmp}/hf_config_text/config.json is not JSON (Expecting property name", "main"),
    ("hf config of llama", "eval", ["hellaswag", HELLASWAG, "hf={tmp}/hf_llama"],
     "error: {tmp}/hf_llama holds a model_type=llama model, not GPT-2; give a Hugging Face GPT-2 dir", "main"),
    ("hf config missing keys", "sample", ["hf={tmp}/hf_no_shape"],
     "error: {tmp}/hf_no_shape/config.json lacks the GPT-2 shape (n_layer=None, n_head=None must be positive "
     "integers)", "main"),
    ("hf config heads do not divide", "sample", ["hf={tmp}/hf_heads"],
     "error: {tmp}/hf_heads/config.json has n_embd=8, not divisible by n_head=3", "main"),
    ("hf truncated safetensors", "sample", ["hf={tmp}/hf_truncated"],
     "error: {tmp}/hf_truncated/model.safetensors is not a readable safetensors file (incomplete metadata, file not "
     "fully covered); export or download it again", "main"),
    ("hf garbage safetensors", "eval", ["hellaswag", HELLASWAG, "hf={tmp}/hf_garbage"],
     "error: {tmp}/hf_garbage/model.safetensors is not a readable safetensors file (header too large); export or "
     "download it again", "main"),
    ("hf empty safetensors", "sample", ["hf={tmp}/hf_empty"],
     "error: {tmp}/hf_empty/model.safetensors is not a readable safetensors file (header too small); export or "
     "download it again", "main"),
    ("hf shapes unlike config", "sample", ["hf={tmp}/hf_wider"],
     "error: {tmp}/hf_wider's weights do not match its config.json (0 missing, 0 unexpected, 16 of another shape",
     "main"),
    ("hf no weights file", "sample", ["hf={tmp}/hf_no_weights"],
     "error: {tmp}/hf_no_weights has config.json but no weights (model.safetensors or pytorch_model.bin)", "main"),
    ("hf dir missing", "eval", ["hellaswag", HELLASWAG, "hf={tmp}/no_such_hf"],
     "error: {tmp}/no_such_hf does not exist; give a Hugging Face GPT-2 dir", "main"),
    ("hf export of a truncated dir", "export", ["{tmp}/hf_truncated", "{tmp}/out_new"],
     "error: {tmp}/hf_truncated/model.safetensors is not a readable safetensors file", "main"),
    # checkpoints: foreign, damaged, missing
    ("sample tensor .pt", "sample", ["resume={tmp}/tensor.pt"],
     "error: {tmp}/tensor.pt is not a gpt_exp checkpoint (no model, config and step); give a run dir", "main"),
    ("sample dict .pt", "sample", ["resume={tmp}/foreign_dict.pt"],
     "error: {tmp}/foreign_dict.pt is not a gpt_exp checkpoint (no model, config and step)", "main"),
    ("eval state_dict .pt", "eval", ["hellaswag", HELLASWAG, "resume={tmp}/state_dict.pt"],
     "error: {tmp}/state_dict.pt is not a gpt_exp checkpoint (no model, config and step)", "main"),
    ("export truncated .pt", "export", ["{tmp}/truncated.pt", "{tmp}/out_new"],
     "error: resume: {tmp}/truncated.pt is not a readable gpt_exp checkpoint (", "main"),
    ("eval truncated .pt", "eval", ["hellaswag", HELLASWAG, "resume={tmp}/truncated.pt"],
     "error: resume: {tmp}/truncated.pt is not a readable gpt_exp checkpoint (", "main"),
    ("sample ckpt weights unlike config", "sample", ["resume={tmp}/other_shape.pt"],
     "error: {tmp}/other_shape.pt's weights do not match its config (0 missing, 0 unexpected, 17 of another shape",
     "main"),
    ("sample dir without checkpoints", "sample", ["resume={tmp}/empty_sweep"],
     "error: resume={tmp}/empty_sweep holds no checkpoint (checkpoints/step_*.pt)", "main"),
    ("export source missing", "export", ["{tmp}/no_such_run", "{tmp}/out_new"],
     "error: {tmp}/no_such_run does not exist; give a run dir (outputs/<date>/<time>) or a checkpoint file", "main"),
    ("eval resume missing", "eval", ["hellaswag", HELLASWAG, "resume={tmp}/no_such_run"],
     "error: resume={tmp}/no_such_run does not exist; give a run dir", "main"),
    ("sample CLI foreign .pt", "sample", ["resume={tmp}/tensor.pt"],
     "error: {tmp}/tensor.pt is not a gpt_exp checkpoint", "cli"),
    # export's output dir
    ("export into a dir with files", "export", ["{tmp}/run", "{tmp}/out_notes"],
     "error: {tmp}/out_notes already holds files (notes.txt); export into a new or empty dir", "main"),
    ("export onto a HF dir", "export", ["{tmp}/run", "{tmp}/hf"],
     "error: {tmp}/hf already holds files (config.json, generation_config.json, merges.txt and 4 more); export "
     "into a new or empty dir", "main"),
    ("export onto a file", "export", ["{tmp}/run", "{tmp}/notes.txt"],
     "error: {tmp}/notes.txt is a file; give a new dir", "main"),
    ("export under a file", "export", ["{tmp}/run", "{tmp}/notes.txt/hf"],
     "error: {tmp}/notes.txt is a file, so {tmp}/notes.txt/hf cannot be created", "main"),
    ("export into the root dir", "export", ["{tmp}/run", "/"],
     "error: / already holds files (", "main"),
    ("export without arguments", "export", [],
     "error: the following arguments are required: RUN_DIR_OR_CKPT, OUT_DIR", "main"),
    ("export CLI into a dir with files", "export", ["{tmp}/run", "{tmp}/out_notes"],
     "error: {tmp}/out_notes already holds files (notes.txt)", "cli"),
    # sample's options
    ("sample unknown key", "sample", ["resume={tmp}/run", "tempreature=0.5"],
     "error: unknown key 'tempreature'; did you mean temperature?", "main"),
    ("sample wrong type", "sample", ["resume={tmp}/run", "num_samples=two"],
     "error: num_samples=two is invalid: it must be an integer", "main"),
    ("sample num_samples 0", "sample", ["resume={tmp}/run", "num_samples=0"],
     "error: num_samples=0 is invalid: it must be >= 1", "main"),
    ("sample max_new_tokens negative", "sample", ["resume={tmp}/run", "max_new_tokens=-5"],
     "error: max_new_tokens=-5 is invalid: it must be >= 1", "main"),
    ("sample top_k 0", "sample", ["resume={tmp}/run", "top_k=0"], "error: top_k=0 is invalid: it must be >= 1", "main"),
    ("sample temperature 0", "sample", ["resume={tmp}/run", "temperature=0"],
     "error: temperature=0.0 is invalid: it must be > 0 and finite, e.g. 1.0", "main"),
    ("sample temperature negative", "sample", ["resume={tmp}/run", "temperature=-1"],
     "error: temperature=-1.0 is invalid: it must be > 0", "main"),
    ("sample temperature nan", "sample", ["resume={tmp}/run", "temperature=nan"],
     "error: temperature=nan is invalid: it must be > 0 and finite", "main"),
    ("sample prompt over block size", "sample", ["resume={tmp}/run", "prompt=" + " ".join(["word"] * 40)],
     "error: prompt is 40 tokens, more than the model's block_size=32 that it can see; shorten the prompt", "main"),
    ("sample no model", "sample", ["prompt=Hi"], "error: name one model: resume=RUN_DIR", "main"),
    # eval: damaged HellaSwag files
    ("eval hellaswag not JSON", "eval", ["hellaswag", "path={tmp}/hs_text.jsonl", "resume={tmp}/run"],
     "error: {tmp}/hs_text.jsonl:2: not JSON (Expecting property name", "main"),
    ("eval hellaswag missing keys", "eval", ["hellaswag", "path={tmp}/hs_keys.jsonl", "resume={tmp}/run"],
     "error: {tmp}/hs_keys.jsonl:1: not a HellaSwag example (a ctx string, 4 endings and a label 0-3)", "main"),
    ("eval hellaswag wrong label", "eval", ["hellaswag", "path={tmp}/hs_label.jsonl", "resume={tmp}/run"],
     "error: {tmp}/hs_label.jsonl:1: not a HellaSwag example", "main"),
    ("eval hellaswag empty", "eval", ["hellaswag", "path={tmp}/hs_empty.jsonl", "resume={tmp}/run"],
     "error: {tmp}/hs_empty.jsonl holds no examples; use the official hellaswag_val.jsonl", "main"),
    ("eval hellaswag binary", "eval", ["hellaswag", "path={tmp}/hs_binary.jsonl", "resume={tmp}/run"],
     "error: {tmp}/hs_binary.jsonl is not UTF-8 text", "main"),
    ("eval without path", "eval", ["hellaswag", "resume={tmp}/run"], "error: hellaswag needs path=FILE", "main"),
    ("eval unknown task", "eval", ["hellaswg", HELLASWAG], "error: unknown eval 'hellaswg'; choose one of: hellaswag",
     "main"),
    # eval core: damaged eval bundles
    ("eval core without bundle", "eval", ["core", "resume={tmp}/run"], f"error: core needs bundle=DIR; {CORE_FIX}",
     "main"),
    ("eval core given path", "eval", ["core", "path={tmp}/core_good", "resume={tmp}/run"],
     "error: path={tmp}/core_good is not read by eval core; give bundle=DIR", "main"),
    ("eval core bundle missing", "eval", ["core", "bundle={tmp}/no_such_bundle", "resume={tmp}/run"],
     f"error: bundle={{tmp}}/no_such_bundle is not a dir; {CORE_FIX}", "main"),
    ("eval core no core.yaml", "eval", ["core", "bundle={tmp}/core_no_yaml", "resume={tmp}/run"],
     f"error: {{tmp}}/core_no_yaml/core.yaml does not exist; {CORE_FIX}", "main"),
    ("eval core core.yaml not YAML", "eval", ["core", "bundle={tmp}/core_yaml_text", "resume={tmp}/run"],
     "error: {tmp}/core_yaml_text/core.yaml is not valid YAML (ParserError)", "main"),
    ("eval core no tasks", "eval", ["core", "bundle={tmp}/core_no_tasks", "resume={tmp}/run"],
     "error: {tmp}/core_no_tasks/core.yaml lists no icl_tasks (a list of tasks with label, dataset_uri, num_fewshot, "
     "icl_task_type)", "main"),
    ("eval core task file missing", "eval", ["core", "bundle={tmp}/core_no_file", "resume={tmp}/run"],
     "error: {tmp}/core_no_file/eval_data/demo/schema_demo.jsonl does not exist (a dataset_uri of core.yaml, under "
     "eval_data/)", "main"),
    ("eval core malformed row", "eval", ["core", "bundle={tmp}/core_bad_row", "resume={tmp}/run"],
     "error: {tmp}/core_bad_row/eval_data/demo/mc_demo.jsonl:2: not a multiple_choice row (a query string, a list of "
     "at least 2 choice strings and gold, an index into them); repair or delete that line", "main"),
    ("eval core row not JSON", "eval", ["core", "bundle={tmp}/core_text_row", "resume={tmp}/run"],
     "error: {tmp}/core_text_row/eval_data/demo/schema_demo.jsonl:4: not JSON; repair or delete that line", "main"),
    ("eval core unknown task type", "eval", ["core", "bundle={tmp}/core_bad_type", "resume={tmp}/run"],
     "error: {tmp}/core_bad_type/core.yaml: icl_tasks[0] (mc_demo): unknown icl_task_type='ranking'; use one of "
     "multiple_choice, schema, language_modeling", "main"),
    ("eval core bad num_fewshot", "eval", ["core", "bundle={tmp}/core_bad_shots", "resume={tmp}/run"],
     "error: {tmp}/core_bad_shots/core.yaml: icl_tasks[1] (schema_demo): num_fewshot=['two'] is not a count >= 0",
     "main"),
    ("eval core missing baseline", "eval", ["core", "bundle={tmp}/core_no_baseline", "resume={tmp}/run"],
     "error: {tmp}/core_no_baseline/eval_meta_data.csv has no Random baseline for task schema_demo; add its row "
     "(Eval Task: schema_demo)", "main"),
    ("eval core baseline not a number", "eval", ["core", "bundle={tmp}/core_baseline_text", "resume={tmp}/run"],
     "error: {tmp}/core_baseline_text/eval_meta_data.csv:2: Random baseline='a quarter' for 'mc_demo' is not a "
     "percentage in [0, 100); repair that row", "main"),
    ("eval core no meta data", "eval", ["core", "bundle={tmp}/core_no_csv", "resume={tmp}/run"],
     "error: {tmp}/core_no_csv/eval_meta_data.csv does not exist (it holds each task's random baseline)", "main"),
    ("eval core limit negative", "eval", ["core", "bundle={tmp}/core_good", "resume={tmp}/run", "limit=-1"],
     "error: limit=-1 is invalid: it must be >= 0", "main"),
    ("eval CLI core unknown task type", "eval", ["core", "bundle={tmp}/core_bad_type", "resume={tmp}/run"],
     "error: {tmp}/core_bad_type/core.yaml: icl_tasks[0] (mc_demo): unknown icl_task_type='ranking'", "cli"),
    # coord_check's options: refused before any tokens are read or any model is built
    ("coord_check lr nan", "coord_check", ["--lr", "nan"],
     "error: --lr nan is invalid: it must be a positive number, e.g. --lr 0.01", "main"),
    ("coord_check lr negative", "coord_check", ["--lr", "-1"],
     "error: --lr -1.0 is invalid: it must be a positive", "main"),
    ("coord_check base width 0", "coord_check", ["--base-width", "0"],
     "error: --base-width 0 is invalid: it must be >= 1, e.g. --base-width 64 (muP's base width)", "main"),
    ("coord_check base width negative", "coord_check", ["--base-width", "-8"],
     "error: --base-width -8 is invalid: it must be >= 1", "main"),
    ("coord_check huge width", "coord_check", ["--widths", "64,1000000"],
     "error: --widths: width 1000000 is 24,050,349M parameters, ~358,378.1 GiB to train (weights, gradients, Adam's "
     "state), more than this machine's", "main"),
    ("eval CLI hellaswag missing keys", "eval", ["hellaswag", "path={tmp}/hs_keys.jsonl", "resume={tmp}/run"],
     "error: {tmp}/hs_keys.jsonl:1: not a HellaSwag example", "cli"),
]


def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**TINY)).eval()


def make_run(run_dir: Path, metrics: bytes | str | None = None, summary: str | None = None,
             config: bytes | str | None = None) -> None:
    """A run dir as `python -m gpt_exp.run` leaves it, with any of its three files replaced."""
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    good_config = yaml.safe_dump({"B": 4, "T": 32, "model": dict(name="tiny", **TINY), "train": {"seed": 1}})
    good_metrics = "".join(json.dumps({"step": s, "loss": 10.0 - s, "tokens": 128 * (s + 1)}) + "\n" for s in range(3))
    for name, value, default in ((".hydra/config.yaml", config, good_config), ("metrics.jsonl", metrics, good_metrics),
                                 ("summary.json", summary, json.dumps({"status": "completed", "steps": 3}))):
        value = default if value is None else value
        if value is not False:
            path = run_dir / name
            path.write_bytes(value if isinstance(value, bytes) else value.encode())


def hf_copy(tmp: Path, name: str, config: dict | None = None, weights: bytes | None = None) -> Path:
    """A copy of the good HF dir, its config.json changed by `config` and its weights replaced by `weights`."""
    path = tmp / name
    shutil.copytree(tmp / "hf", path)
    if config is not None:
        good = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**good, **config}))
    if weights is not None:
        (path / SAFETENSORS).write_bytes(weights)
    return path


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    """The folder of every input: valid bases made by the project's own code, and each damaged copy."""
    tmp = tmp_path_factory.mktemp("bad_input_tools")
    model = tiny_model()
    (tmp / "notes.txt").write_text("the user's own notes\n")

    # a run with a checkpoint, written by the code a run uses
    make_run(tmp / "run")
    state = {"step": 2, "tokens": 256, "model": model.state_dict(), "config": {"model": {"name": "tiny", **TINY}}}
    save_checkpoint(tmp / "run", state, keep=2)
    ckpt = tmp / "run" / "checkpoints" / "step_0000002.pt"
    torch.save(torch.zeros(3), tmp / "tensor.pt")
    torch.save({"weights": [1, 2, 3], "epoch": 4}, tmp / "foreign_dict.pt")
    torch.save(torch.nn.Linear(4, 4).state_dict(), tmp / "state_dict.pt")
    (tmp / "truncated.pt").write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    wider = {"name": "tiny", **TINY, "n_embd": 16}
    torch.save({**state, "config": {"model": wider}}, tmp / "other_shape.pt")

    # compare's damaged runs
    runs = tmp / "runs"
    good = (tmp / "run" / "metrics.jsonl").read_text().splitlines()
    make_run(runs / "broken_middle", metrics="\n".join([good[0], '{"step": 1, "lo', good[2]]) + "\n")
    make_run(runs / "binary", metrics=bytes(range(256)) * 4)
    make_run(runs / "no_step", metrics='{"loss": 3.0}\n{"loss": 2.0}\n')
    make_run(runs / "text_loss", metrics=good[0] + '\n{"step": 1, "loss": "low"}\n')
    make_run(runs / "list_row", metrics="[1, 2]\n")
    make_run(runs / "summary_text", summary="{status: completed")
    make_run(runs / "summary_list", summary="[1, 2]")
    make_run(runs / "summary_value", summary='{"status": "completed", "final_loss": "low"}')
    make_run(runs / "config_broken", config="model: {name: tiny\ntrain: [")
    make_run(runs / "config_list", config="- 1\n- 2\n")
    make_run(runs / "config_missing", config=False)
    make_run(runs / "metrics_dir", metrics=False)
    (runs / "metrics_dir" / "metrics.jsonl").mkdir()
    (tmp / "empty_sweep").mkdir()
    (tmp / "empty_sweep" / "multirun.yaml").write_text("hydra: {}\n")
    (tmp / "unreadable").mkdir()
    make_run(tmp / "unreadable" / "0")

    # Hugging Face dirs: a good one written by export's code, then damaged copies
    save_hf_gpt2(model, tmp / "hf")
    weights = (tmp / "hf" / SAFETENSORS).read_bytes()
    tensors = read_safetensors(tmp / "hf" / SAFETENSORS)
    for name, drop in (("hf_sharded", None), ("hf_partial", 2)):
        path = hf_copy(tmp, name)
        (path / SAFETENSORS).unlink()
        names = sorted(tensors)
        shards = {f"model-0000{i}-of-00002.safetensors": names[i - 1 :: 2] for i in (1, 2)}
        for shard, keys in shards.items():
            write_safetensors({k: tensors[k] for k in keys}, path / shard)
        index = {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
        if drop:
            (path / f"model-0000{drop}-of-00002.safetensors").unlink()
    (hf_copy(tmp, "hf_index_text") / SAFETENSORS).unlink()
    (tmp / "hf_index_text" / "model.safetensors.index.json").write_text('{"weight_map": {')
    (hf_copy(tmp, "hf_config_text") / "config.json").write_text("{model_type: gpt2")
    hf_copy(tmp, "hf_llama", config={"model_type": "llama"})
    hf_copy(tmp, "hf_no_shape", config={"n_layer": None, "n_head": None})
    hf_copy(tmp, "hf_heads", config={"n_head": 3})
    hf_copy(tmp, "hf_truncated", weights=weights[: len(weights) // 2])
    hf_copy(tmp, "hf_garbage", weights=b"\x93NUMPY not a safetensors file" * 10)
    hf_copy(tmp, "hf_empty", weights=b"")
    hf_copy(tmp, "hf_wider", config={"n_embd": 16})
    (hf_copy(tmp, "hf_no_weights") / SAFETENSORS).unlink()

    # export's output dirs that hold the user's files
    (tmp / "out_notes").mkdir()
    (tmp / "out_notes" / "notes.txt").write_text("mine\n")

    # HellaSwag files
    (tmp / "hellaswag.jsonl").write_text(json.dumps(EXAMPLE) + "\n")
    (tmp / "hs_text.jsonl").write_text(json.dumps(EXAMPLE) + "\n{ctx: 'a man'}\n")
    (tmp / "hs_keys.jsonl").write_text(json.dumps({"ctx": "A man", "endings": ["a", "b", "c", "d"]}) + "\n")
    (tmp / "hs_label.jsonl").write_text(json.dumps({**EXAMPLE, "label": 4}) + "\n")
    (tmp / "hs_empty.jsonl").write_text("")
    (tmp / "hs_binary.jsonl").write_bytes(b"\xff\xfe\x00\x01" * 64)

    # CORE eval bundles: a good one, then one damage each
    good = {"mc_demo": ("multiple_choice", MC, 1, None), "schema_demo": ("schema", SCHEMA, 0, None)}
    baselines = {"mc_demo": 25.0, "schema_demo": 50.0}
    write_bundle(tmp / "core_good", good, baselines)
    (write_bundle(tmp / "core_no_yaml", good, baselines) / "core.yaml").unlink()
    (write_bundle(tmp / "core_yaml_text", good, baselines) / "core.yaml").write_text("icl_tasks: [\n  - {label: ")
    (write_bundle(tmp / "core_no_tasks", good, baselines) / "core.yaml").write_text("icl_tasks: []\n")
    (write_bundle(tmp / "core_no_file", good, baselines) / "eval_data" / "demo" / "schema_demo.jsonl").unlink()
    write_bundle(tmp / "core_bad_row", {**good, "mc_demo": ("multiple_choice", [MC[0], {**MC[1], "gold": 3}], 1, None)},
                 baselines)
    bad = write_bundle(tmp / "core_text_row", good, baselines) / "eval_data" / "demo" / "schema_demo.jsonl"
    bad.write_text(bad.read_text() + "{context_options: [\n")
    write_bundle(tmp / "core_bad_type", {**good, "mc_demo": ("ranking", MC, 1, None)}, baselines)
    write_bundle(tmp / "core_bad_shots", {**good, "schema_demo": ("schema", SCHEMA, "two", None)}, baselines)
    write_bundle(tmp / "core_no_baseline", good, {"mc_demo": 25.0})
    write_bundle(tmp / "core_baseline_text", good, {"mc_demo": "a quarter", "schema_demo": 50.0})
    (write_bundle(tmp / "core_no_csv", good, baselines) / "eval_meta_data.csv").unlink()

    if not IS_ROOT:
        (tmp / "unreadable").chmod(0)
    yield tmp
    (tmp / "unreadable").chmod(0o755)  # so that pytest can remove it


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file and dir under `root`: its kind, size and modification time."""
    return {str(p.relative_to(root)): (p.is_dir(), p.stat().st_size if p.is_file() else 0, p.stat().st_mtime_ns)
            for p in root.rglob("*")}


def run_tool(tool: str, args: list[str], how: str, cwd: Path, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `python -m gpt_exp.<tool> ARGS`, in-process through its main or as the CLI."""
    if how == "cli":
        result = run_cli(tool, *args, cwd=cwd)
        return result.returncode, result.stdout, result.stderr
    try:
        code = MAINS[tool](args)
    except SystemExit as e:  # argparse's usage errors exit
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(code: int, out: str, err: str, expected: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err and "Traceback" not in out
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0], f"\n{lines[0]}\n{expected}"
    assert out == ""


@pytest.mark.parametrize("case, tool, args, expected, how", CASES,
                         ids=[c.values[0] if hasattr(c, "values") else c[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(tmp, tmp_path, capsys, case, tool, args, expected, how):
    before = snapshot(tmp)
    code, out, err = run_tool(tool, [a.format(tmp=tmp) for a in args], how, tmp_path, capsys)
    assert_one_error_line(code, out, err, expected.format(tmp=tmp))
    assert snapshot(tmp) == before  # nothing removed, overwritten or left half-written


def test_the_base_inputs_work(tmp, tmp_path, capsys):
    """The damaged inputs fail for their damage: the inputs they were copied from load and run."""
    assert sample.main([f"resume={tmp}/run", "max_new_tokens=2", "num_samples=1"]) == 0
    assert sample.main([f"hf={tmp}/hf", "max_new_tokens=2", "num_samples=1"]) == 0
    assert evals.main(["hellaswag", f"path={tmp}/hellaswag.jsonl", f"resume={tmp}/run"]) == 0
    assert evals.main(["core", f"bundle={tmp}/core_good", f"resume={tmp}/run"]) == 0
    assert compare.main([f"{tmp}/run", "--out", str(tmp_path / "report")]) == 0
    assert export.main([f"{tmp}/run", str(tmp_path / "export")]) == 0
    sharded, whole = load_hf_gpt2(tmp / "hf_sharded"), load_model(str(tmp / "run"))[0]
    assert all(torch.equal(a, b) for a, b in zip(sharded.state_dict().values(), whole.state_dict().values()))
    capsys.readouterr()


def test_incomplete_runs_are_rows_not_errors(tmp_path, capsys):
    """A run with no metrics yet, an empty metrics.jsonl, a NaN loss (a diverged run) or a run named twice is a
    row of the table, not an error."""
    make_run(tmp_path / "sweep" / "0", metrics=False, summary=False)
    make_run(tmp_path / "sweep" / "1", metrics="", summary=False)
    make_run(tmp_path / "sweep" / "2", metrics='{"step": 0, "loss": 3.5}\n{"step": 1, "loss": NaN}\n',
             summary='{"status": "diverged", "steps": 2}')
    assert compare.main([str(tmp_path / "sweep"), str(tmp_path / "sweep" / "0"), "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "compare.json").read_text())
    assert [(r["steps"], r["status"]) for r in rows] == [(2, "diverged"), (0, compare.RUNNING), (0, compare.RUNNING)]
    assert rows[0]["best_loss"] == 3.5 and rows[0]["run_dirs"] == [str(tmp_path / "sweep" / "2")]


def test_export_that_fails_midway_leaves_nothing(tmp, tmp_path, capsys, monkeypatch):
    """A full disk after model.safetensors is written: no OUT_DIR that looks complete, no temp dir left."""
    def disk_full(path, data):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(hf, "atomic_write_bytes", disk_full)
    (tmp_path / "mine.txt").write_text("the user's file\n")
    before = snapshot(tmp_path)
    code, out, err = run_tool("export", [f"{tmp}/run", str(tmp_path / "out")], "main", tmp_path, capsys)
    assert_one_error_line(code, out, err, "(No space left on device); free disk space, fix its permissions, "
                                          "or export elsewhere")
    assert snapshot(tmp_path) == before


def test_export_past_a_file_size_limit_is_one_line(tmp, tmp_path):
    """The weights' write fails for real (a 500 kB file size limit, EFBIG where a full disk gives ENOSPC; the
    safetensors library reports it only in its message): one line naming the file, no temp dir left behind."""
    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (500_000, resource.RLIM_INFINITY))

    (tmp_path / "area").mkdir()
    result = subprocess.run([sys.executable, "-m", "gpt_exp.export", f"{tmp}/run", "area/out"], cwd=tmp_path,
                            env=cli_env(tmp_path), capture_output=True, text=True, preexec_fn=limit_file_size,
                            timeout=300)
    assert_one_error_line(result.returncode, result.stdout, result.stderr,
                          f"/{SAFETENSORS} (File too large); free disk space, fix its permissions, or export elsewhere")
    assert result.stderr.startswith("error: cannot write area/.out.")  # the temp dir, removed since
    assert list((tmp_path / "area").iterdir()) == []


def test_export_into_an_empty_dir_replaces_it_whole(tmp, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "plain").mkdir()
    assert export.main([f"{tmp}/run", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "plain"]  # no temp dir beside it
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json", "generation_config.json", "merges.txt", SAFETENSORS, "special_tokens_map.json",
        "tokenizer_config.json", "vocab.json"]
    assert (tmp_path / "out").stat().st_mode == (tmp_path / "plain").stat().st_mode  # an ordinary dir
    exported, original = load_hf_gpt2(tmp_path / "out"), tiny_model()
    assert all(torch.equal(a, b) for a, b in zip(exported.state_dict().values(), original.state_dict().values()))
    capsys.readouterr()


def _write_first_arg(argv):
    open(argv[0], "w")


@pytest.mark.parametrize("name, where", [("run", "hydra.run.dir=DIR, data.cache_dir=DIR"), ("prepare", "data.cache_dir=DIR"),
                                         ("compare", "--out DIR"), ("scaling", "--out DIR"),
                                         ("coord_check", "--out DIR"), ("export", "another OUT dir")])
def test_a_failed_write_names_the_option_of_the_command_that_failed(capsys, name, where):
    # each command as `python -m gpt_exp.NAME` runs it: its module is __main__, its spec names it
    globals_ = {"__name__": "__main__", "__spec__": importlib.util.find_spec(f"gpt_exp.{name}")}
    main = command(types.FunctionType(_write_first_arg.__code__, globals_))
    assert _command_name(main.__wrapped__) == name
    with pytest.raises(OSError) as raised:
        main.__wrapped__(["/proc/no/such/dir/file"])
    line = user_error_line(raised.value, name)
    assert line == f"cannot write /proc/no/such/dir/file (No such file or directory); free disk space, fix its " \
                   f"permissions, or write elsewhere ({where})"
    assert main(["/proc/no/such/dir/file"]) == 2 and capsys.readouterr().err == f"error: {line}\n"
    full = user_error_line(OSError(errno.ENOSPC, "No space left on device", "/x"), name)
    assert full == f"cannot write /x (No space left on device); free disk space, or write elsewhere ({where})"
