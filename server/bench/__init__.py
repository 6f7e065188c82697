"""Benchmarks: the HumanEval fill-in-the-middle eval (`kodkod eval`) and the keystroke-trace
latency benchmark (`kodkod bench http`). See docs/benchmarks.md."""
