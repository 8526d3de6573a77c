"""Preflight: turn every record into a training sample once, before any weights are loaded, and report every
record that would fail mid-run (a corrupt image, an image span cut by max_length, no assistant tokens left...).

Used by every recipe and by scripts/validate_data.py. By default all problems are listed and the run stops;
with skip_bad_records the bad records are dropped, and how many and which is always printed.
"""

from torch.utils.data import DataLoader, Dataset

from vlm_recipes.data import DataError


class RecordCheck(Dataset):
    """Item k is None when record k of `dataset` becomes a sample, else the problem with it."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> str | None:
        try:
            self.dataset[index]
        except DataError as error:
            return str(error)
        return None


def check_every_record(dataset, num_workers: int = 0) -> list[tuple[int, str]]:
    """(index, problem) for each record of a ConversationDataset that cannot become a sample."""
    loader = DataLoader(RecordCheck(dataset), batch_size=64, num_workers=num_workers, collate_fn=list)
    problems, index = [], 0
    for batch in loader:
        for problem in batch:
            if problem is not None:
                problems.append((index, problem))
            index += 1
    return problems


def preflight(dataset, what: str, skip_bad_records: bool = False, num_workers: int = 0, log=print):
    """The dataset, checked: raises a DataError listing every bad record, or drops them when asked to."""
    problems = check_every_record(dataset, num_workers)
    if not problems:
        log(f"preflight: all {len(dataset)} records of {what} become training samples")
        return dataset
    if not skip_bad_records:
        shown = "\n  ".join(message for _, message in problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        raise DataError(
            f"{len(problems)} of {len(dataset)} records of {what} cannot become training samples (found before "
            f"loading the model):\n  {shown}{more}\nFix them, or pass --skip_bad_records true to train without them."
        )
    bad = {index for index, _ in problems}
    log(f"preflight: skipping {len(bad)} of {len(dataset)} records of {what}:")
    for _, message in problems[:50]:
        log(f"  {message}")
    if len(problems) > 50:
        log(f"  ... and {len(problems) - 50} more")
    dataset.records = [record for k, record in enumerate(dataset.records) if k not in bad]
    if not dataset.records:
        raise DataError(f"preflight: every record of {what} is bad; nothing left to train on")
    return dataset
