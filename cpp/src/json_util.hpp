// JSON as Python's json module reads it, for manifest.json.
#pragma once

#include <nlohmann/json.hpp>
#include <string>

namespace turbotrt {

using Json = nlohmann::ordered_json;  // keeps the file's key order, which Python's checks follow

// Parse like json.loads: NaN, Infinity and -Infinity (which json.dumps writes) are accepted and
// read as null (only informative fields, such as validation reports, ever hold them).
Json parse_json(const std::string& text);
// Python's type name of a JSON value as json.loads returns it: dict, list, str, int, float, bool, NoneType.
std::string py_type(const Json& v);
// Python's repr() of a JSON value as json.loads returns it.
std::string py_repr(const Json& v);

}  // namespace turbotrt
