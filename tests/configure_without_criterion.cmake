# Configures a fresh build of the project as a user without Criterion would (pkg-config finds
# nothing): the default must succeed with tests off and say so in one line; KVC_BUILD_TESTS=ON (the
# test command's setting) must fail and say why. Arguments: SOURCE_DIR, OUT_DIR, CC.
file(REMOVE_RECURSE ${OUT_DIR})
file(MAKE_DIRECTORY ${OUT_DIR}/empty-pkgconfig)
set(ENV{PKG_CONFIG_LIBDIR} ${OUT_DIR}/empty-pkgconfig)
set(ENV{PKG_CONFIG_PATH} "")
set(common -S ${SOURCE_DIR} -DCMAKE_C_COMPILER=${CC} -DKVC_ENABLE_CUDA=OFF -DKVC_BUILD_BENCH=OFF)

execute_process(COMMAND ${CMAKE_COMMAND} ${common} -B ${OUT_DIR}/auto
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "configuring without Criterion failed (${rc}):\n${out}${err}")
endif()
string(REGEX MATCHALL "kvcompress: tests OFF[^\n]*" lines "${out}")
list(LENGTH lines count)
if(NOT count EQUAL 1 OR EXISTS ${OUT_DIR}/auto/tests)
  message(FATAL_ERROR "expected one 'kvcompress: tests OFF' status line and no tests/ directory:\n${out}${err}")
endif()
message(STATUS "default configure: ${lines}")

execute_process(COMMAND ${CMAKE_COMMAND} ${common} -B ${OUT_DIR}/on -DKVC_BUILD_TESTS=ON
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(rc EQUAL 0 OR NOT err MATCHES "KVC_BUILD_TESTS is ON but Criterion was not found")
  message(FATAL_ERROR "KVC_BUILD_TESTS=ON without Criterion must fail naming Criterion (${rc}):\n${out}${err}")
endif()
message(STATUS "KVC_BUILD_TESTS=ON without Criterion fails as it should")
