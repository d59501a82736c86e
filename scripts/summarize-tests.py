#!/usr/bin/env python3
"""Adds up the test cases in JUnit XML files (Meson's merged logs and the rxe runner's
gtest output) and prints one line: 'total: N passed, M failed, K skipped'.
Exits 1 when a file is missing or unreadable, when something failed, or when no test ran."""
import sys
import xml.etree.ElementTree as ET


def main(paths):
    passed = failed = skipped = 0
    ok = True
    for path in paths:
        try:
            root = ET.parse(path).getroot()
        except (OSError, ET.ParseError) as e:
            print(f"summarize-tests: cannot read {path}: {e}", file=sys.stderr)
            ok = False
            continue
        for case in root.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed += 1
            elif case.find("skipped") is not None or case.get("result") == "skipped":
                skipped += 1
            else:
                passed += 1
    print(f"total: {passed} passed, {failed} failed, {skipped} skipped")
    return 0 if ok and failed == 0 and passed > 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
