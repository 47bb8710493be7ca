#include "json_util.hpp"

#include <cmath>
#include <cstdio>

#include "files.hpp"

namespace turbotrt {

Json parse_json(const std::string& text) {
  // Replace the non-standard literals outside strings by null.
  std::string s = text;
  bool in_string = false;
  for (size_t i = 0; i < s.size(); ++i) {
    char c = s[i];
    if (in_string) {
      if (c == '\\') ++i;
      else if (c == '"') in_string = false;
      continue;
    }
    if (c == '"') {
      in_string = true;
      continue;
    }
    for (const char* lit : {"-Infinity", "Infinity", "NaN"}) {
      size_t n = std::char_traits<char>::length(lit);
      if (s.compare(i, n, lit) == 0) {
        s.replace(i, n, "null");
        i += 3;
        break;
      }
    }
  }
  return Json::parse(s);
}

std::string py_type(const Json& v) {
  switch (v.type()) {
    case Json::value_t::object: return "dict";
    case Json::value_t::array: return "list";
    case Json::value_t::string: return "str";
    case Json::value_t::boolean: return "bool";
    case Json::value_t::number_integer:
    case Json::value_t::number_unsigned: return "int";
    case Json::value_t::number_float: return "float";
    default: return "NoneType";
  }
}

std::string py_repr(const Json& v) {
  switch (v.type()) {
    case Json::value_t::null: return "None";
    case Json::value_t::boolean: return v.get<bool>() ? "True" : "False";
    case Json::value_t::string: return py_repr(v.get<std::string>());
    case Json::value_t::number_float: {
      double d = v.get<double>();
      if (std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 1e16) {
        char buf[32];
        std::snprintf(buf, sizeof buf, "%.1f", d);
        return buf;
      }
      return v.dump();
    }
    case Json::value_t::array: {
      std::string out = "[";
      for (size_t i = 0; i < v.size(); ++i) out += (i ? ", " : "") + py_repr(v[i]);
      return out + "]";
    }
    case Json::value_t::object: {
      std::string out = "{";
      bool first = true;
      for (auto it = v.begin(); it != v.end(); ++it, first = false)
        out += (first ? "" : ", ") + py_repr(it.key()) + ": " + py_repr(it.value());
      return out + "}";
    }
    default: return v.dump();
  }
}

}  // namespace turbotrt
