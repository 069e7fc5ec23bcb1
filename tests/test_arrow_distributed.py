"""Two CPU ranks (torch.distributed.run, gloo) open the same `--data_path`: the local main process converts to Arrow
first and the other rank finds and reuses its cache; a bad record stops both ranks with its error instead of leaving
one waiting at the barrier."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tga.records_io import load_records as read_json_records
from tga.train.distributed import free_port

pytestmark = pytest.mark.distributed

SCRIPT = textwrap.dedent("""
    import json, os, sys
    from tga.config import parse_config
    from tga.data.arrow_records import open_records
    from tga.train.distributed import prepare_process

    _, data_args, _, args = parse_config(prepare_process(sys.argv[1:]))
    cache = data_args.data_cache_dir
    with args.main_process_first(desc="records to Arrow"):
        seen = sorted(n for n in os.listdir(cache) if not n.startswith(".")) if os.path.isdir(cache) else []
        records = open_records(data_args.data_path, cache_dir=cache, num_proc=data_args.preprocessing_num_workers)
    result = {"seen_on_entry": seen, "ids": [r.id for r in records], "lengths": records.modality_lengths}
    with open(os.path.join(args.output_dir, f"rank{args.process_index}.json"), "w") as handle:
        json.dump(result, handle)
""")


def launch(tmp_path, data, name):
    script = tmp_path / "open_records_script.py"
    script.write_text(SCRIPT)
    output = tmp_path / name
    output.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(script), "--data_path", data, "--data_cache_dir", str(tmp_path / "cache"),
               "--preprocessing_num_workers", "2", "--output_dir", str(output), "--report_to", "none"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    return result, output


def test_main_process_converts_once_and_the_other_rank_reuses_it(tiny_assets, tmp_path):
    result, output = launch(tmp_path, tiny_assets["stage2"], "good")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads((output / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0]["seen_on_entry"] == []  # rank 0 found an empty cache and converted
    assert ranks[1]["seen_on_entry"] == os.listdir(tmp_path / "cache") and len(ranks[1]["seen_on_entry"]) == 1
    expected = [str(raw["id"]) for raw in read_json_records(tiny_assets["stage2"])]
    assert ranks[0]["ids"] == ranks[1]["ids"] == expected and ranks[0]["lengths"] == ranks[1]["lengths"]


def test_bad_record_stops_both_ranks_with_its_error(tiny_assets, tmp_path):
    records = read_json_records(tiny_assets["stage2"])
    records.insert(3, {"id": "broken-3", "conversations": [{"from": "gpt", "value": "answer first"}]})
    data = tmp_path / "bad.json"
    data.write_text(json.dumps(records))
    result, _ = launch(tmp_path, str(data), "bad")
    assert result.returncode != 0
    assert result.stderr.count(f"record 'broken-3' in {data}") >= 2  # both ranks report it; neither hangs
