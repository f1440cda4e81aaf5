namespace ActorVmm.Memory;

/// <summary>What one A-bit scan saw of one guest RAM page (see <see cref="VmspaceProtocol.SampleAccessed"/>).</summary>
[Flags]
public enum PageSample : byte
{
    None = 0,
    /// <summary>The page has contents in the memfd.</summary>
    Resident = 0b0000_0001,
    /// <summary>The guest touched it since the previous scan (A was set, or a fault mapped it).</summary>
    Accessed = 0b0000_0010,
    /// <summary>A <c>GpaHold</c> pins it: never a victim.</summary>
    Held = 0b0000_0100,
}

/// <summary>
/// The swapper's page aging, without Akka (FreeBSD's pageout daemon ages pages by
/// <c>pmap_ts_referenced</c> on each pass; Linux's idle page tracking counts the same way): one age
/// per guest RAM page = the scans in a row that found it resident and not accessed. A touched,
/// held or non-resident page has age 0.
/// <para>Victims are (1) every page idle for <see cref="ColdScans"/> scans or more, and (2) while
/// the resident pages still exceed a target, the oldest of the rest that were idle in at least the
/// last scan — never a page the last scan saw accessed.</para>
/// </summary>
public sealed class PageAging
{
    private readonly byte[] _age;

    public int ColdScans { get; }
    public ulong Pages => (ulong)_age.Length;

    public PageAging(ulong pages, int coldScans)
    {
        if (coldScans < 1 || coldScans > byte.MaxValue) throw new ArgumentOutOfRangeException(nameof(coldScans), coldScans, "cold scans must be 1..255");
        _age = new byte[pages];
        ColdScans = coldScans;
    }

    public int Age(ulong page) => _age[page];

    /// <summary>Folds in one scan; <paramref name="sample"/>[i] is page i.</summary>
    public void Observe(ReadOnlySpan<PageSample> sample)
    {
        if ((ulong)sample.Length != Pages) throw new ArgumentException($"a sample of {sample.Length} pages for {Pages} pages");
        for (var i = 0; i < sample.Length; i++)
        {
            var s = sample[i];
            var idle = (s & PageSample.Resident) != 0 && (s & (PageSample.Accessed | PageSample.Held)) == 0;
            _age[i] = idle ? (byte)Math.Min(_age[i] + 1, byte.MaxValue) : (byte)0;
        }
    }

    /// <summary>
    /// The pages to swap out after the last <see cref="Observe"/>, in ascending order.
    /// <paramref name="residentPages"/> are resident now; <paramref name="targetResident"/> = 0: no
    /// target (only cold pages go).
    /// </summary>
    public ulong[] Victims(ulong residentPages, ulong targetResident)
    {
        var victims = new List<ulong>();
        var warm = new List<ulong>();
        for (var p = 0UL; p < Pages; p++)
        {
            if (_age[p] >= ColdScans) victims.Add(p);
            else if (_age[p] > 0) warm.Add(p);
        }
        if (targetResident > 0 && residentPages > targetResident + (ulong)victims.Count)
        {
            var more = residentPages - targetResident - (ulong)victims.Count;
            // Oldest first; among equals, the lower page (a stable order).
            victims.AddRange(warm.OrderByDescending(p => _age[p]).ThenBy(p => p).Take((int)Math.Min(more, (ulong)warm.Count)));
            victims.Sort();
        }
        return victims.ToArray();
    }
}
