"""Performance tools: how fast the pipeline runs against the cost of its model calls (throughput), the tensor
operations around those calls (op_count), host-device synchronisations (sync_check), and the prepared GPU check
(gpu_check.sh) with its verdicts (gpu_summary). Built on diffguard_pl.profiling."""
