"""Ray's `ray.job_submission` module path: re-exports of `redray.jobs.sdk`."""

from redray.jobs.sdk import JobDetails, JobStatus, JobSubmissionClient

JobInfo = JobDetails

__all__ = ["JobDetails", "JobInfo", "JobStatus", "JobSubmissionClient"]
