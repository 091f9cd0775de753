//! Manifest pages for clients that allow partial manifests (Bulk Data 3.0.0). Page 1 is what the
//! status URL serves; each page lists at most `EXPORT_MANIFEST_PAGE_SIZE` files of finished
//! shards and is stored create-only when first served, so that it never changes afterwards. A page
//! links the next once there is more to list; that page is stored then, so the link always leads
//! to a page that stands.

use std::collections::BTreeSet;

use serde_json::{json, Value};

use super::schema::{Job, JobStatus, ShardStatus};
pub use super::schema::{Listed, Page};
use super::{manifest, ExportError, Exports};

/// What a request for a manifest page finds.
#[derive(Debug)]
pub enum Served {
    /// Page 1 of a running export that has no finished file yet.
    NothingYet,
    /// No such page (yet).
    Missing,
    /// The page as a manifest, with a `next` link when there is more to list.
    Page(Value),
}

/// Page `number` (from 1) of a job that allows partial manifests, given its `done` shards (one
/// listing per poll); `page_url` gives the URL of a page.
pub async fn serve(
    exports: &Exports,
    job: &Job,
    number: usize,
    done: &BTreeSet<usize>,
    page_url: impl Fn(usize) -> String,
) -> Result<Served, ExportError> {
    let size = exports.limits.manifest_page_size.max(1);
    let page = match exports.jobs.page(&job.id, number).await? {
        Some(page) => page,
        None if number == 1 => match gather(exports, job, done, &Listed::default(), size).await? {
            Some(page) => exports.jobs.create_page(&job.id, 1, page).await?,
            None if job.status == JobStatus::Completed => {
                let empty = Page {
                    output: Vec::new(),
                    listed: Listed::default(),
                };
                exports.jobs.create_page(&job.id, 1, empty).await?
            }
            None => return Ok(Served::NothingYet),
        },
        None => return Ok(Served::Missing),
    };
    let has_next = match exports.jobs.page(&job.id, number + 1).await? {
        Some(_) => true,
        None => match gather(exports, job, done, &page.listed, size).await? {
            Some(next) => {
                exports.jobs.create_page(&job.id, number + 1, next).await?;
                true
            }
            None => false,
        },
    };
    let mut manifest = manifest::build(job, &page.output);
    if has_next {
        manifest["link"] = json!([{"relation": "next", "url": page_url(number + 1)}]);
    }
    Ok(Served::Page(manifest))
}

/// The next page after `listed`: files of `done` shards not listed yet (the shard listed in part
/// first, then by shard number), at most `size`; `None` when there are none.
async fn gather(
    exports: &Exports,
    job: &Job,
    done: &BTreeSet<usize>,
    listed: &Listed,
    size: usize,
) -> Result<Option<Page>, ExportError> {
    let partial_shard = listed.partial.map(|(shard, _)| shard);
    let candidates = listed.partial.into_iter().chain(
        done.iter()
            .filter(|shard| !listed.shards.contains(shard) && partial_shard != Some(**shard))
            .map(|&shard| (shard, 0)),
    );
    let mut next = listed.clone();
    let mut output = Vec::new();
    for (shard, skip) in candidates {
        if output.len() >= size {
            break;
        }
        let files = match exports.jobs.shard(&job.id, shard).await? {
            Some(_) if !job.shards[shard].kind.is_listed() => Vec::new(),
            Some(state) if state.status == ShardStatus::Done => state.outputs,
            _ => continue,
        };
        let unlisted = files.get(skip..).unwrap_or_default();
        let room = size - output.len();
        if unlisted.len() <= room {
            output.extend_from_slice(unlisted);
            next.shards.insert(shard);
            if partial_shard == Some(shard) {
                next.partial = None;
            }
        } else {
            output.extend_from_slice(&unlisted[..room]);
            next.partial = Some((shard, skip + room));
        }
    }
    Ok((!output.is_empty()).then_some(Page {
        output,
        listed: next,
    }))
}
