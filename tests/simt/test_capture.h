// test_capture.h - what the emulator's self-tests need to check its reports.
#pragma once

#include <unistd.h>

#include <cstdio>
#include <string>

// Runs fn with stderr captured; returns what it printed (also echoed, for the test log).
template <class F>
std::string capture_stderr(F fn) {
  fflush(stderr);
  int saved = dup(2);
  FILE *tmp = tmpfile();
  dup2(fileno(tmp), 2);
  fn();
  fflush(stderr);
  dup2(saved, 2);
  close(saved);
  std::string text;
  rewind(tmp);
  char buf[4096];
  for (size_t n; (n = fread(buf, 1, sizeof buf, tmp)) > 0;) text.append(buf, n);
  fclose(tmp);
  fputs(text.c_str(), stderr);
  return text;
}

inline bool contains(const std::string &text, const std::string &what) {
  return text.find(what) != std::string::npos;
}
