"""tga/cli/job_summary.py

Printing the end-of-run summary of a record-filling job (`tga retrieve`, `tga caption`): what was written or
how to resume, how many records were processed, reused or passed through, and every skipped record's id.
"""

from __future__ import annotations

from tga.image_jobs import JobReport
from tga.records_io import PARTIAL_SUFFIX


def print_summary(report: JobReport, flag_meanings: dict[str, str]) -> None:
    """Print a job report.

    Args:
        report: the job's report.
        flag_meanings: explanation printed beside each counted flag.
    """
    if report.complete:
        print(f"wrote {report.out_path} ({report.total_records} records)")
    else:
        print(f"stopped early; partial results in {report.out_path}{PARTIAL_SUFFIX}; rerun the same command to resume")
    print(
        f"processed {report.processed}, resumed {report.resumed}, passed through {report.passed_through}, "
        f"skipped {len(report.skipped_ids)}"
    )
    for flag, count in sorted(report.flags.items()):
        print(f"{flag}: {count} ({flag_meanings.get(flag, flag)})")
    if report.skipped_ids:
        print("skipped records (bad images): " + ", ".join(report.skipped_ids))
