#include "nm/core/status.h"

#include <gtest/gtest.h>

namespace nm {
namespace {

Result<int> half(int x) {
  if (x % 2 != 0) return invalid_argument("x: must be even");
  return x / 2;
}

Result<int> quarter(int x) {
  NM_ASSIGN_OR_RETURN(int h, half(x));
  NM_ASSIGN_OR_RETURN(int q, half(h));
  return q;
}

TEST(Status, CodeNamesRoundTripToDbusErrorSuffixes) {
  for (Code c : {Code::kInvalidArgument, Code::kNotFound, Code::kAlreadyExists, Code::kConflict,
                 Code::kQuotaExceeded, Code::kInsufficientCapacity, Code::kUnavailable,
                 Code::kAccessDenied, Code::kInternal}) {
    EXPECT_EQ(code_from_name(code_name(c)), c);
  }
  EXPECT_EQ(code_name(Code::kNotFound), "NotFound");
  EXPECT_EQ(code_from_name("Bogus"), Code::kInternal);
}

TEST(Result, PropagatesTheFirstError) {
  EXPECT_EQ(*quarter(8), 2);
  auto r = quarter(6);
  ASSERT_FALSE(r.is_ok());
  EXPECT_EQ(r.status().to_string(), "InvalidArgument: x: must be even");
  EXPECT_EQ(r.status().with_context("spec").message(), "spec: x: must be even");
}

}  // namespace
}  // namespace nm
