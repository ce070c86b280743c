# Installs the built library into a temporary prefix, moves the prefix (the install must be
# relocatable), and builds and runs tests/install/consumer.c as a user would: through
# find_package (shared and static targets) and through pkg-config (shared, with an rpath, and
# --static against a copy of the prefix without the shared library).
# Arguments: BUILD_DIR, SOURCE_DIR (tests/install), OUT_DIR, CC, SANITIZE.
set(expected "consumer: libkvcompress [0-9.]+ KVC_SUCCESS, kept 1 3 5 7, values moved: yes")

function(run what)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${what} failed (${rc}):\n${out}${err}")
  endif()
  set(run_output "${out}" PARENT_SCOPE)
endfunction()

function(check_program what program)
  run("${what}: running" ${program})
  if(NOT run_output MATCHES "${expected}")
    message(FATAL_ERROR "${what}: unexpected output: ${run_output}")
  endif()
  message(STATUS "${what}: ${run_output}")
endfunction()

file(REMOVE_RECURSE ${OUT_DIR})
file(MAKE_DIRECTORY ${OUT_DIR})
run("install" ${CMAKE_COMMAND} --install ${BUILD_DIR} --prefix ${OUT_DIR}/staging)
file(RENAME ${OUT_DIR}/staging ${OUT_DIR}/prefix)
set(prefix ${OUT_DIR}/prefix)
file(GLOB pc_files ${prefix}/*/pkgconfig/kvcompress.pc ${prefix}/*/*/pkgconfig/kvcompress.pc)
list(LENGTH pc_files count)
if(NOT count EQUAL 1)
  message(FATAL_ERROR "expected one installed kvcompress.pc under ${prefix}, found: ${pc_files}")
endif()
get_filename_component(pc_dir ${pc_files} DIRECTORY)

set(flags "")
if(SANITIZE)
  set(flags -fsanitize=${SANITIZE})
endif()

# find_package, shared and static
run("find_package: configure" ${CMAKE_COMMAND} -S ${SOURCE_DIR} -B ${OUT_DIR}/find -DCMAKE_PREFIX_PATH=${prefix}
    -DCMAKE_C_COMPILER=${CC} "-DCMAKE_C_FLAGS=${flags}" "-DCMAKE_EXE_LINKER_FLAGS=${flags}")
run("find_package: build" ${CMAKE_COMMAND} --build ${OUT_DIR}/find)
check_program("find_package kvcompress::kvcompress" ${OUT_DIR}/find/consumer_shared)
check_program("find_package kvcompress::kvcompress_static" ${OUT_DIR}/find/consumer_static)

# pkg-config, shared: the README's rpath
set(ENV{PKG_CONFIG_PATH} ${pc_dir})
run("pkg-config --cflags --libs" pkg-config --cflags --libs kvcompress)
separate_arguments(pc_flags UNIX_COMMAND "${run_output}")
run("pkg-config --variable=libdir" pkg-config --variable=libdir kvcompress)
string(STRIP "${run_output}" libdir)
file(REAL_PATH ${libdir} libdir_real)
file(REAL_PATH ${prefix} prefix_real)
if(NOT libdir_real MATCHES "^${prefix_real}/")
  message(FATAL_ERROR "kvcompress.pc's libdir ${libdir} is not inside the moved prefix ${prefix}")
endif()
run("pkg-config shared: compile" ${CC} ${flags} ${SOURCE_DIR}/consumer.c -o ${OUT_DIR}/pc_shared ${pc_flags}
    -Wl,-rpath,${libdir})
check_program("pkg-config shared" ${OUT_DIR}/pc_shared)

# pkg-config --static, against a prefix that holds only the static library
file(COPY ${prefix}/ DESTINATION ${OUT_DIR}/prefix_static PATTERN "*.so*" EXCLUDE)
string(REPLACE "${prefix}" "${OUT_DIR}/prefix_static" pc_dir_static "${pc_dir}")
set(ENV{PKG_CONFIG_PATH} ${pc_dir_static})
run("pkg-config --static --cflags --libs" pkg-config --static --cflags --libs kvcompress)
separate_arguments(pc_flags UNIX_COMMAND "${run_output}")
run("pkg-config static: compile" ${CC} ${flags} ${SOURCE_DIR}/consumer.c -o ${OUT_DIR}/pc_static ${pc_flags})
check_program("pkg-config --static" ${OUT_DIR}/pc_static)
