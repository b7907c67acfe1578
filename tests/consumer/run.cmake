# ctest script: install the build into a scratch prefix, then build and run
# tests/consumer against it, shared and static, with find_package(polyak)
# and with pkg-config.
set(prefix ${WORK_DIR}/prefix)
file(REMOVE_RECURSE ${WORK_DIR})

function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "failed (${rc}): ${ARGN}\n${out}\n${err}")
  endif()
  message(STATUS "${out}")
endfunction()

run(${CMAKE_COMMAND} --install ${BUILD_DIR} --prefix ${prefix})
# the command installed with the library runs from the prefix
run(${prefix}/bin/polyak-consolidate --help)

# 1. find_package(polyak) -> polyak::polyak
run(${CMAKE_COMMAND} -S ${SOURCE_DIR} -B ${WORK_DIR}/cmake_build -DCMAKE_PREFIX_PATH=${prefix}
    -DCMAKE_C_COMPILER=${C_COMPILER})
run(${CMAKE_COMMAND} --build ${WORK_DIR}/cmake_build)
run(${WORK_DIR}/cmake_build/consumer)
run(${WORK_DIR}/cmake_build/consumer_static)

# the static consumers carry the library: no libpolyak.so among their needs
function(expect_static program)
  execute_process(COMMAND readelf -d ${program} OUTPUT_VARIABLE dynamic RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0 OR dynamic MATCHES "libpolyak")
    message(FATAL_ERROR "${program} is not linked with libpolyak.a:\n${dynamic}")
  endif()
endfunction()
expect_static(${WORK_DIR}/cmake_build/consumer_static)

# 2. pkg-config --cflags --libs polyak
find_program(PKG_CONFIG pkg-config)
if(NOT PKG_CONFIG)
  message(STATUS "install_consumer: no pkg-config on this machine, so only the CMake package "
                 "was checked (scripts/setup.sh installs pkg-config)")
  return()
endif()
file(GLOB_RECURSE pc_files ${prefix}/polyak.pc)
list(GET pc_files 0 pc_file)
get_filename_component(pc_dir ${pc_file} DIRECTORY)
set(ENV{PKG_CONFIG_PATH} ${pc_dir})
execute_process(COMMAND ${PKG_CONFIG} --cflags --libs polyak OUTPUT_VARIABLE flags
                OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "pkg-config does not know polyak")
endif()
if(flags MATCHES "\\.\\.")
  message(FATAL_ERROR "pkg-config gives paths through '..': ${flags}")
endif()
separate_arguments(flags UNIX_COMMAND "${flags}")
execute_process(COMMAND ${PKG_CONFIG} --variable=libdir polyak OUTPUT_VARIABLE libdir
                OUTPUT_STRIP_TRAILING_WHITESPACE)
# the shared library from outside the system paths needs an rpath (README)
run(${C_COMPILER} ${SOURCE_DIR}/main.c -o ${WORK_DIR}/consumer_pc ${flags} -Wl,-rpath,${libdir})
run(${WORK_DIR}/consumer_pc)

# 3. pkg-config --cflags --libs polyak-static: the static library
execute_process(COMMAND ${PKG_CONFIG} --cflags --libs polyak-static OUTPUT_VARIABLE static_flags
                OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE rc)
if(NOT rc EQUAL 0 OR NOT static_flags MATCHES "libpolyak\\.a")
  message(FATAL_ERROR "pkg-config polyak-static: '${static_flags}'")
endif()
separate_arguments(static_flags UNIX_COMMAND "${static_flags}")
run(${C_COMPILER} ${SOURCE_DIR}/main.c -o ${WORK_DIR}/consumer_pc_static ${static_flags})
run(${WORK_DIR}/consumer_pc_static)
expect_static(${WORK_DIR}/consumer_pc_static)
# and --static lists what the archive needs
execute_process(COMMAND ${PKG_CONFIG} --static --libs polyak OUTPUT_VARIABLE private_flags
                OUTPUT_STRIP_TRAILING_WHITESPACE)
if(NOT private_flags MATCHES "-ljansson")
  message(FATAL_ERROR "pkg-config --static --libs polyak lacks the private libraries: '${private_flags}'")
endif()
