"""Spate's fault harness: real `spate` nodes, real faults, real Kafka clients, and a checker that
judges the recorded history.

Modules, each named for what it owns:
  history   the JSONL history every component appends to (monotonic timestamps)
  checker   judges a saved history: anomalies, unavailability windows, summary JSON
  timeline  the SVG timeline (throughput and fault bands) of a history
  netns     network namespaces, veth pairs and a bridge; link cuts and slow links (tc)
  nodes     process control of real `spate` nodes: start, SIGKILL, SIGSTOP/SIGCONT, readiness
  nemesis   seeded fault schedules and the code that applies them
  workload  confluent-kafka producers and consumers that record what they see
  run       one run: nodes + workload + nemesis, then the final read and the checker

Run from tests/:  python3 -m chaos.run --help,  python3 -m chaos.checker HISTORY,
python3 -m chaos.netns cleanup.
"""
