"""Anchors that our all-reduce is measured against in the same run (DESIGN.md section 6).

    from bench.baselines.gloo_allreduce import run_gloo          # torch.distributed gloo, fp32
    from bench.baselines.hivemind_allreduce import run_hivemind  # hivemind DecentralizedAverager

Both take a ``bench.links.Links`` (open) and return a JSON-able dict of medians and raw samples.
At top level these modules import only the standard library, bench.common and bench.links (whose
peer.netns / peer.netem are stdlib-only): the hivemind workers run them under
bench/.venv-hivemind (numpy<2, no project dependencies), not the project's environment.
"""
