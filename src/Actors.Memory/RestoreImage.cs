using ActorVmm.LibVmm;
using Microsoft.Win32.SafeHandles;

namespace ActorVmm.Memory;

/// <summary>
/// The restore source of one vmspace (<see cref="MemoryRestore"/>), without Akka. Opening it checks
/// the file, empties guest RAM (a restore replaces all of it) and copies the firmware part. Then
/// either <see cref="LoadAll"/> (eager) copies the RAM extents into the memfd, or the pager brings
/// pages in one at a time (lazy): <see cref="IsPending"/> says a RAM page still lives only in the
/// file; <see cref="Read"/> reads it and <see cref="Taken"/> counts it restored.
/// </summary>
internal sealed class RestoreImage : IDisposable
{
    private const ulong Page = MemoryImage.PageSize;

    private readonly SafeFileHandle _file;
    private readonly bool[] _pending;
    private readonly PageAD[]? _savedAD;

    public MemoryRestore Source { get; }
    /// <summary>RAM pages with data in the file.</summary>
    public ulong ImagePages { get; }
    /// <summary>RAM pages brought in from the file so far.</summary>
    public long RestoredPages { get; private set; }
    /// <summary>RAM pages that still live only in the file (lazy).</summary>
    public ulong PendingPages { get; private set; }
    public bool Closed => _file.IsClosed;
    /// <summary>The file, for copying pending pages into a new snapshot.</summary>
    internal SafeFileHandle File => _file;

    private RestoreImage(MemoryRestore source, SafeFileHandle file, bool[] pending, ulong imagePages, PageAD[]? savedAD)
    {
        Source = source;
        _file = file;
        _pending = pending;
        ImagePages = imagePages;
        PendingPages = imagePages;
        _savedAD = savedAD;
    }

    /// <summary>Opens and checks <paramref name="source"/> for <paramref name="memory"/> (throws
    /// <see cref="MemoryImageException"/> on a wrong length or A/D file), punches all guest RAM out of
    /// its memfd and copies the firmware part into the read-only backings.</summary>
    public static RestoreImage Open(GuestMemoryMap memory, MemoryRestore source)
    {
        SafeFileHandle file;
        try { file = System.IO.File.OpenHandle(source.Path, FileMode.Open, FileAccess.Read); }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException) { throw new MemoryImageException($"memory file {source.Path}: {e.Message}"); }
        try
        {
            MemoryImage.CheckLength(memory, file, source.Path);
            var ram = new RamPages(memory);
            var savedAD = source.AccessedDirtyPath is { } ad ? MemoryImage.ReadAccessedDirty(ad, ram.Total) : null;
            var pending = new bool[ram.Total];
            var imagePages = 0UL;
            foreach (var (offset, length) in SparseFiles.DataRanges(file, 0, ram.Total * Page))
            {
                var first = offset / Page;
                var end = (offset + length + Page - 1) / Page;
                for (var p = first; p < end && p < ram.Total; p++)
                    if (!pending[p]) { pending[p] = true; imagePages++; }
            }
            foreach (var r in ram.Ranges) r.Backing.PunchHole(r.MemfdOffset(r.FirstPage), r.Pages * Page);
            foreach (var (region, fileOffset) in MemoryImage.ReadOnlyParts(memory))
                ReadExactly(file, region.HostSpan(0, (int)region.Size), (long)fileOffset, source.Path);
            return new RestoreImage(source, file, pending, imagePages, savedAD);
        }
        catch
        {
            file.Dispose();
            throw;
        }
    }

    public bool IsPending(ulong page) => page < (ulong)_pending.Length && _pending[page];

    /// <summary>The saved D of a page (null: no A/D file was given).</summary>
    public bool? SavedDirty(ulong page) => _savedAD is null ? null : (_savedAD[page] & PageAD.Dirty) != 0;

    /// <summary>Reads pending page <paramref name="page"/> into <paramref name="into"/> (4 KiB); the
    /// caller then fills the page (<see cref="Taken"/> when it did).</summary>
    public void Read(ulong page, Span<byte> into) => ReadExactly(_file, into, (long)(page * Page), Source.Path);

    /// <summary>Reads part of pending page <paramref name="page"/> (a host read: the page stays pending).</summary>
    public void ReadPart(ulong page, int inPage, Span<byte> into) => ReadExactly(_file, into, (long)(page * Page) + inPage, Source.Path);

    /// <summary>The page is in guest memory now: no longer pending.</summary>
    public void Taken(ulong page)
    {
        if (!_pending[page]) return;
        _pending[page] = false;
        PendingPages--;
        RestoredPages++;
    }

    /// <summary>Eager: copies every data extent of the RAM part into the memfd (through the host view:
    /// pread straight into the mapping) and marks all pages taken.</summary>
    public void LoadAll(RamPages ram)
    {
        for (var p = 0UL; p < (ulong)_pending.Length; p++)
        {
            if (!_pending[p]) continue;
            var n = 1UL;
            while (p + n < (ulong)_pending.Length && _pending[p + n] && n < 1UL << 18) n++;
            foreach (var (r, f, count) in ram.Runs(p, n))
            {
                ReadExactly(_file, r.Backing.HostSpan(r.MemfdOffset(f), (int)(count * Page)), (long)(f * Page), Source.Path);
                for (var q = f; q < f + count; q++) Taken(q);
            }
            p += n - 1;
        }
    }

    /// <summary>Runs of pending pages, for copying them on.</summary>
    public IEnumerable<(ulong First, ulong Count)> PendingRuns()
    {
        for (var p = 0UL; p < (ulong)_pending.Length; p++)
        {
            if (!_pending[p]) continue;
            var n = 1UL;
            while (p + n < (ulong)_pending.Length && _pending[p + n]) n++;
            yield return (p, n);
            p += n - 1;
        }
    }

    private static void ReadExactly(SafeFileHandle file, Span<byte> into, long offset, string path)
    {
        var done = 0;
        while (done < into.Length)
        {
            var n = RandomAccess.Read(file, into[done..], offset + done);
            if (n <= 0) throw new MemoryImageException($"memory file {path}: short read at 0x{offset + done:X}");
            done += n;
        }
    }

    public void Dispose() => _file.Dispose();
}
