# nm::warnings: the project's warning set, linked PRIVATE by every target.
add_library(nm_warnings INTERFACE)
add_library(nm::warnings ALIAS nm_warnings)
target_compile_options(nm_warnings INTERFACE
  -Wall -Wextra -Wpedantic -Wshadow -Wconversion -Wsign-conversion -Wnon-virtual-dtor
  $<$<BOOL:${NM_WERROR}>:-Werror>)
