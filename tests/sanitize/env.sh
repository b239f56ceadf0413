# Sourced from the repository root by `make test-sanitize` (and by anyone running the ASan + UBSan
# build by hand): . tests/sanitize/env.sh && ctest --test-dir build-asan. POSIX sh (make runs /bin/sh).
# Only this project's code is instrumented; torch's libraries are not, which is what the options and
# suppressions below account for. Each is explained where it is set.
_mixsga_sanitize_dir="$(pwd)/tests/sanitize"

# allocator_may_return_null=1: the fuzz harness asks for impossible sizes on purpose (2^50 elements);
#   a normal build's allocator fails and torch raises c10::OutOfMemoryError, so ASan must fail the
#   same way (return nullptr) instead of aborting the process.
# detect_leaks=1 + suppressions=lsan.supp: leaks are checked at exit. torch's process-lifetime
#   allocations (operator registries, thread pools) stay reachable from globals, so LSan does not
#   report them and lsan.supp is empty; it is where a suppression for one would go, with its reason.
# abort_on_error=1 / halt_on_error=1: the first report ends the test, so ctest sees the failure.
# detect_stack_use_after_return=0: it makes every instrumented frame allocate from a fake stack, which
#   slows the gtests several times over for a check that adds little over the default heap checks here.
export ASAN_OPTIONS="allocator_may_return_null=1:detect_leaks=1:abort_on_error=1:halt_on_error=1:detect_stack_use_after_return=0"
export LSAN_OPTIONS="suppressions=${_mixsga_sanitize_dir}/lsan.supp:print_suppressions=0"
# halt_on_error=1 matches -fno-sanitize-recover=undefined; print_stacktrace=1 says where; abort_on_error=1
#   ends the process with SIGABRT, on which mixsga_fuzz prints the case to replay.
export UBSAN_OPTIONS="halt_on_error=1:abort_on_error=1:print_stacktrace=1:suppressions=${_mixsga_sanitize_dir}/ubsan.supp"
unset _mixsga_sanitize_dir
