"""`make serve`: assemble the served repository from the export and run tritonserver in the foreground.

    python -m mmgpt.serving.launch --export-dir artifacts/export --repo-dir artifacts/triton_repo \\
        --host 127.0.0.1 --grpc-port 8001 --http-port 8000 --metrics-port 8002

On SIGTERM / Ctrl-C it drains: new requests are refused, running answers finish (up to 30 s), then it exits 0.
Models load (and warm up) at startup; a model whose process dies is loaded again (the model-control API is
locked to this launcher).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmgpt.serving.repository import ExportMissingError, ServeSettings, assemble_repository


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmgpt.serving.launch", description=__doc__.split("\n\n")[0])
    p.add_argument("--export-dir", default="artifacts/export", help="what `make export` wrote (default artifacts/export)")
    p.add_argument("--repo-dir", default="artifacts/triton_repo", help="where the served repository is written (replaced)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 = every interface)")
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--log-file", help="server log (default: tritonserver.log beside the repository)")
    p.add_argument("--log-verbose", type=int, default=0, help="Triton's --log-verbose level")
    defaults = ServeSettings()
    p.add_argument("--max-inflight", type=int, default=defaults.llm_max_batch_size,
                   help=f"sequences the LLM decodes together (default {defaults.llm_max_batch_size})")
    p.add_argument("--entry-instances", type=int, default=defaults.entry_instances,
                   help=f"requests the entry point answers at once (default {defaults.entry_instances})")
    p.add_argument("--ort-threads", type=int, default=defaults.ort_threads,
                   help="ONNX Runtime intra-op threads per session (default 0 = all cores)")
    p.add_argument("--prefix-cache-mb", type=int, default=defaults.llm_prefix_cache_mb,
                   help=f"keys/values of finished sequences kept for later turns (default {defaults.llm_prefix_cache_mb}; 0 = off)")
    p.add_argument("--prefill-chunk", type=int, default=defaults.llm_prefill_chunk_tokens,
                   help=f"prompt tokens a shared-KV decoder reads per iteration (default {defaults.llm_prefill_chunk_tokens})")
    p.add_argument("--vision-cache-mb", type=int, default=defaults.vision_cache_mb,
                   help=f"image embeddings kept for repeated images (default {defaults.vision_cache_mb}; 0 = off)")
    p.add_argument("--kv-budget-mb", type=int, default=defaults.llm_kv_budget_mb,
                   help=f"keys/values the LLM's running sequences may grow to; more requests wait, then get a "
                        f"busy error (default {defaults.llm_kv_budget_mb}; 0 = no budget)")
    a = p.parse_args(argv)

    from mmgpt.serving.tritonserver import TritonNotFoundError, TritonServer

    try:
        repo = assemble_repository(a.export_dir, a.repo_dir, llm_max_batch_size=a.max_inflight,
                                   entry_instances=a.entry_instances, ort_threads=a.ort_threads,
                                   llm_prefix_cache_mb=a.prefix_cache_mb, vision_cache_mb=a.vision_cache_mb,
                                   llm_prefill_chunk_tokens=a.prefill_chunk, llm_kv_budget_mb=a.kv_budget_mb)
    except (ExportMissingError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log_file = Path(a.log_file) if a.log_file else repo.parent / "tritonserver.log"
    print(f"serving {repo} (models: {', '.join(sorted(d.name for d in repo.iterdir() if d.is_dir()))})", flush=True)
    try:
        server = TritonServer(
            repo, host=a.host, grpc_port=a.grpc_port, http_port=a.http_port, metrics_port=a.metrics_port,
            log_file=log_file, log_verbose=a.log_verbose,
        )
    except TritonNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return server.run_foreground()


if __name__ == "__main__":
    sys.exit(main())
