using ActorVmm.LibVmm;
using Microsoft.Win32.SafeHandles;

namespace ActorVmm.Memory;

/// <summary>
/// Every write to guest RAM while someone copies memory ahead of time (a migration's pre-copy, a
/// checkpoint): the guest's, through KVM's dirty log on the RAM memslots (KVM api.rst,
/// KVM_GET_DIRTY_LOG; without manual protection each read returns a slot's log and re-arms it at
/// once), and the host's, through the memory's write log (<see cref="GuestMemoryMap.LogHostWrites"/>),
/// which KVM does not see. Several named logs may be on at once, each with the pages written since
/// its own last <see cref="Take"/>; both sources are on while any is. Pages held by devices
/// (<see cref="VmspaceProtocol.Hold"/>) count as written at every Take: a holder writes through the
/// host view whenever it likes. Used on the vmspace's thread only.
/// </summary>
internal sealed class RamWriteLog(GuestMemoryMap memory, RamPages ram, VmHandle kvm)
{
    private readonly Dictionary<string, ulong[]> _logs = [];

    public bool IsOn(string log) => _logs.ContainsKey(log);

    /// <summary>Starts log <paramref name="log"/> (again: empty). The first log turns both sources on,
    /// and KVM write-protects every page.</summary>
    public void Start(string log)
    {
        if (_logs.Count == 0)
        {
            memory.LogHostWrites(true);
            try { memory.SetDirtyLogging(kvm, true); }
            catch
            {
                memory.LogHostWrites(false);
                throw;
            }
        }
        else Harvest();
        _logs[log] = new ulong[(ram.Total + 63) / 64];
    }

    /// <summary>Stops log <paramref name="log"/>; the last one turns both sources off (KVM maps the
    /// guest's pages writable again as it touches them).</summary>
    public void Stop(string log)
    {
        if (!_logs.Remove(log) || _logs.Count > 0) return;
        try { memory.SetDirtyLogging(kvm, false); }
        finally { memory.LogHostWrites(false); }
    }

    /// <summary>Stops every log.</summary>
    public void StopAll()
    {
        foreach (var log in _logs.Keys.ToArray()) Stop(log);
    }

    /// <summary>The RAM pages written since log <paramref name="log"/> started or was last taken,
    /// ascending, and the held pages; that log starts over. A write that races this call is in this
    /// answer or the next.</summary>
    public List<ulong> Take(string log, IEnumerable<(ulong First, ulong Count)> held)
    {
        Harvest();
        var written = _logs[log];
        foreach (var (first, count) in held)
            for (var p = first; p < first + count && p < ram.Total; p++) written[p / 64] |= 1UL << (int)(p % 64);
        var pages = new List<ulong>();
        for (var w = 0; w < written.Length; w++)
        {
            for (var bits = written[w]; bits != 0; bits &= bits - 1)
                pages.Add((ulong)w * 64 + (ulong)System.Numerics.BitOperations.TrailingZeroCount(bits));
            written[w] = 0;
        }
        return pages;
    }

    /// <summary>Moves what both sources logged into every log.</summary>
    private void Harvest()
    {
        foreach (var r in ram.Ranges)
        {
            var slot = memory.SlotOf(r.Segment);
            var guest = kvm.GetDirtyLog(slot, r.Pages);
            var host = memory.TakeHostWrites((int)slot);
            for (var i = 0UL; i < r.Pages; i++)
                if (((guest[i / 64] | host[i / 64]) & (1UL << (int)(i % 64))) != 0)
                {
                    var p = r.FirstPage + i;
                    foreach (var bits in _logs.Values) bits[p / 64] |= 1UL << (int)(p % 64);
                }
        }
    }

    /// <summary>
    /// Writes the contents of RAM pages <paramref name="pages"/> (ascending) into memory file
    /// <paramref name="file"/> (page p at p × 4 KiB, <see cref="MemoryImage"/>), every page, zero or
    /// not, so that each replaces what the file held. A swapped page (<paramref name="swapped"/>) comes
    /// from the swap file, the others from their memfd with pread, which reads a hole as zeroes without
    /// allocating it (the host view would fault a page in behind userfaultfd's back).
    /// </summary>
    public static void CopyInto(SafeFileHandle file, RamPages ram, IReadOnlyList<ulong> pages, Func<ulong, bool> swapped, SafeFileHandle? swap)
    {
        const ulong page = RamPages.PageSize;
        const ulong maxRun = 256;
        var buffer = new byte[maxRun * page];
        var memfds = new Dictionary<MemfdRegion, SafeFileHandle>();
        try
        {
            foreach (var (r, first, count) in ram.Coalesce(pages, maxRun))
            {
                var bytes = buffer.AsSpan(0, (int)(count * page));
                if (!memfds.TryGetValue(r.Backing, out var memfd))
                    memfds[r.Backing] = memfd = new SafeFileHandle(r.Backing.Fd, ownsHandle: false);
                ReadFully(memfd, bytes, (long)r.MemfdOffset(first));
                for (var p = first; p < first + count; p++)
                    if (swap is not null && swapped(p))
                        ReadFully(swap, bytes.Slice((int)((p - first) * page), (int)page), (long)SwapStore.Offset(p));
                RandomAccess.Write(file, bytes, (long)(first * page));
            }
        }
        finally
        {
            foreach (var h in memfds.Values) h.Dispose();
        }
    }

    /// <summary>pread until <paramref name="into"/> is full; past the end of the file reads as zeroes.</summary>
    private static void ReadFully(SafeFileHandle from, Span<byte> into, long offset)
    {
        var done = 0;
        while (done < into.Length)
        {
            var n = RandomAccess.Read(from, into[done..], offset + done);
            if (n == 0)
            {
                into[done..].Clear();
                return;
            }
            done += n;
        }
    }
}
