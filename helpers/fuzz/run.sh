#!/bin/sh
# make fuzz: run each target for SECONDS from its seeds; one summary line at the end.
#   sh fuzz/run.sh BUILD_DIR SECONDS TARGET...
# Inputs found go to BUILD_DIR/work/<target> (kept: the next run starts from them too);
# a crash's input to BUILD_DIR/crashes/<target>/ and its report to BUILD_DIR/<target>.log.
set -u
build=$1 seconds=$2
shift 2
here=$(dirname "$0")
targets=0 execs=0 crashes=0
for t in "$@"; do
    work=$build/work/$t crash=$build/crashes/$t
    mkdir -p "$work" "$crash" "$here/corpus/$t"
    "$build/fuzz_$t" -max_total_time="$seconds" -print_final_stats=1 -close_fd_mask=3 \
        -timeout=10 -rss_limit_mb=2048 -artifact_prefix="$crash/" \
        "$work" "$here/corpus/$t" > "$build/$t.log" 2>&1
    rc=$?
    n=$(sed -n 's/^stat::number_of_executed_units: *//p' "$build/$t.log" | tail -n 1)
    n=${n:-0}
    targets=$((targets + 1)) execs=$((execs + n))
    if [ $rc -ne 0 ]; then
        crashes=$((crashes + 1))
        echo "fuzz_$t: CRASH (exit $rc) after $n execs; input in $crash/, report in $build/$t.log" >&2
        grep -m 3 -E '^(==[0-9]+==ERROR|SUMMARY|.*runtime error)' "$build/$t.log" >&2
    fi
done
echo "fuzz: targets=$targets execs=$execs crashes=$crashes"
[ $crashes -eq 0 ]
