# ctest script: polyak_trainer run to step 600 straight, and stopped after
# step 250 (its state file written) then resumed from it: the two must
# print the same digest of the params and both averages.
file(REMOVE_RECURSE ${WORK_DIR})
file(MAKE_DIRECTORY ${WORK_DIR})

function(run out)
  execute_process(COMMAND ${TRAINER} ${ARGN} WORKING_DIRECTORY ${WORK_DIR} RESULT_VARIABLE rc
                  OUTPUT_VARIABLE stdout ERROR_VARIABLE stderr)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "polyak_trainer ${ARGN} failed (${rc}):\n${stdout}\n${stderr}")
  endif()
  message(STATUS "polyak_trainer ${ARGN}:\n${stdout}")
  set(${out} "${stdout}" PARENT_SCOPE)
endfunction()

run(straight --steps 600 --state straight.state)
run(stopped --steps 600 --stop-after 250 --state stopped.state)
run(resumed --steps 600 --resume stopped.state)
string(REGEX MATCH "digest[^\n]*" want "${straight}")
string(REGEX MATCH "digest[^\n]*" got "${resumed}")
if(NOT want OR NOT want STREQUAL got)
  message(FATAL_ERROR "the resumed run ends otherwise:\n  straight: ${want}\n  resumed:  ${got}")
endif()
