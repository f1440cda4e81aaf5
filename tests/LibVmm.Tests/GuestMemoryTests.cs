using System.Runtime.InteropServices;

namespace ActorVmm.LibVmm.Tests;

/// <summary><see cref="GuestMemoryMap"/> over real memfd-backed <see cref="MemfdRegion"/>s (no KVM needed).</summary>
public sealed class GuestMemoryTests : IDisposable
{
    private const ulong K64 = 0x1_0000;
    private const ulong MiB = 1024 * 1024;
    private const ulong GiB = 1024 * MiB;

    private readonly GuestMemoryMap _map = new();

    public void Dispose() => _map.Dispose();

    private static GuestPhysAddr Gpa(ulong value) => new(value);

    [Fact]
    public void Write_then_read_round_trips()
    {
        _map.Add("ram", Gpa(0), K64, new MemfdRegion("ram", K64));
        byte[] data = [1, 2, 3, 4, 5, 6, 7, 8, 9];

        Assert.True(_map.TryWrite(Gpa(0x1234), data));
        var back = new byte[data.Length];
        Assert.True(_map.TryRead(Gpa(0x1234), back));

        Assert.Equal(data, back);
        _map.WriteUInt64(Gpa(0x2000), 0x0102_0304_0506_0708);
        Assert.Equal(0x0102_0304_0506_0708ul, _map.ReadUInt64(Gpa(0x2000)));
    }

    [Fact]
    public void Host_view_and_guest_view_are_two_mappings_of_one_memfd()
    {
        var region = new MemfdRegion("ram", K64);
        _map.Add("ram", Gpa(0), K64, region);
        Assert.NotEqual(region.HostView, region.GuestView);

        _map.Write(Gpa(0x3000), [0xAB, 0xCD]);
        Assert.Equal(0xAB, Marshal.ReadByte(region.GuestView, 0x3000));
        Assert.Equal(0xCD, Marshal.ReadByte(region.GuestView, 0x3001));

        Marshal.WriteByte(region.GuestView, 0x4000, 0x5A); // as the guest would
        var b = new byte[1];
        _map.Read(Gpa(0x4000), b);
        Assert.Equal(0x5A, b[0]);
    }

    [Fact]
    public void Host_memory_is_the_guest_view_of_a_range_inside_one_segment_and_empty_otherwise()
    {
        var region = new MemfdRegion("ram", 2 * K64);
        _map.Add("ram", Gpa(0), K64, region);
        _map.Add("high", Gpa(K64), K64, region, backingOffset: K64, owns: false);

        var span = _map.HostMemory(Gpa(0x5000), 3).Span;
        Assert.Equal(3, span.Length);
        span[2] = 0x6B;
        Assert.Equal(0x6B, Marshal.ReadByte(region.GuestView, 0x5002));
        Marshal.WriteByte(region.GuestView, 0x5000, 0x3C); // as the guest would
        Assert.Equal(0x3C, span[0]);

        Assert.Equal((int)K64, _map.HostMemory(Gpa(0), (int)K64).Length); // a whole segment
        Assert.Equal(0x6B, _map.HostMemory(Gpa(0x5002), 1).Span[0]);
        Assert.True(_map.HostMemory(Gpa(K64 - 1), 2).IsEmpty); // across two segments, even of one backing
        Assert.True(_map.HostMemory(Gpa(2 * K64 - 1), 2).IsEmpty); // past the last byte
        Assert.True(_map.HostMemory(Gpa(3 * K64), 1).IsEmpty); // unmapped
        Assert.True(_map.HostMemory(Gpa(0), 0).IsEmpty);
    }

    [Fact]
    public void A_segment_maps_its_backing_from_its_backing_offset()
    {
        var region = new MemfdRegion("bios", 4 * 4096);
        _map.Add("bios-alias", Gpa(0xF_0000), 2 * 4096, region, backingOffset: 2 * 4096);

        _map.Write(Gpa(0xF_0010), [0x77]);

        Assert.Equal(0x77, region.HostSpan(2 * 4096 + 0x10, 1)[0]);
        Assert.Equal(0x77, Marshal.ReadByte(region.GuestView, 2 * 4096 + 0x10));
    }

    [Fact]
    public void Accesses_cross_adjacent_segments()
    {
        var low = new MemfdRegion("low", K64);
        var high = new MemfdRegion("high", K64);
        _map.Add("high", Gpa(K64), K64, high); // out of order on purpose
        _map.Add("low", Gpa(0), K64, low);
        var data = Enumerable.Range(1, 16).Select(i => (byte)i).ToArray();

        _map.Write(Gpa(K64 - 8), data);

        Assert.Equal(data[..8], low.HostSpan(K64 - 8, 8).ToArray());
        Assert.Equal(data[8..], high.HostSpan(0, 8).ToArray());
        var back = new byte[16];
        Assert.True(_map.TryRead(Gpa(K64 - 8), back));
        Assert.Equal(data, back);
        Assert.True(_map.IsMapped(Gpa(0), 2 * K64));
        Assert.Equal(new[] { "low", "high" }, _map.Segments.Select(s => s.Name));
    }

    [Fact]
    public void Accesses_outside_every_segment_fail_and_write_nothing()
    {
        var region = new MemfdRegion("ram", K64);
        _map.Add("ram", Gpa(0), K64, region);
        _map.Add("top", Gpa(3 * K64), K64, new MemfdRegion("top", K64)); // a hole between

        Assert.False(_map.TryRead(Gpa(K64), new byte[1]));
        Assert.False(_map.TryRead(Gpa(K64 - 2), new byte[4])); // straddles the end
        Assert.False(_map.TryWrite(Gpa(K64 - 2), [1, 2, 3, 4]));
        Assert.Equal(new byte[] { 0, 0 }, region.HostSpan(K64 - 2, 2).ToArray());
        Assert.False(_map.IsMapped(Gpa(0), 4 * K64));
        Assert.False(_map.IsMapped(Gpa(ulong.MaxValue - 1), 4)); // wraps
        Assert.Throws<GuestMemoryException>(() => _map.Read(Gpa(2 * K64), new byte[8]));
        Assert.Throws<GuestMemoryException>(() => _map.Write(Gpa(4 * K64), [1]));
        Assert.Throws<GuestMemoryException>(() => _map.ReadUInt64(Gpa(K64 - 4)));
    }

    [Fact]
    public void An_overlapping_segment_is_rejected()
    {
        _map.Add("ram", Gpa(0), 2 * K64, new MemfdRegion("ram", 2 * K64));
        var other = new MemfdRegion("other", K64);

        var e = Assert.Throws<GuestMemoryException>(() => _map.Add("other", Gpa(K64), K64, other, owns: false));

        Assert.Contains("overlaps ram", e.Message);
        Assert.Single(_map.Segments);
        other.Dispose();
    }

    [Theory]
    [InlineData(0x800ul, 0x1000ul)]  // base
    [InlineData(0x1000ul, 0x800ul)]  // size
    [InlineData(0x1000ul, 0ul)]      // empty
    public void An_unaligned_or_empty_segment_is_rejected(ulong @base, ulong size)
    {
        using var region = new MemfdRegion("ram", K64);

        var e = Assert.Throws<GuestMemoryException>(() => _map.Add("bad", Gpa(@base), size, region, owns: false));

        Assert.Contains("not 4 KiB aligned", e.Message);
        Assert.Empty(_map.Segments);
    }

    [Fact]
    public void A_segment_larger_than_its_backing_is_rejected()
    {
        using var region = new MemfdRegion("ram", K64);

        Assert.Throws<GuestMemoryException>(() => _map.Add("big", Gpa(0), K64, region, backingOffset: 4096, owns: false));
    }

    [Fact]
    public void A_region_size_must_be_a_positive_multiple_of_4_KiB()
    {
        Assert.Throws<ArgumentException>(() => new MemfdRegion("odd", 4097));
        Assert.Throws<ArgumentException>(() => new MemfdRegion("empty", 0));
    }

    [Fact]
    public void Dispose_unmaps_owned_regions_only()
    {
        var owned = new MemfdRegion("owned", K64);
        using var borrowed = new MemfdRegion("borrowed", K64);
        var map = new GuestMemoryMap();
        map.Add("owned", Gpa(0), K64, owned);
        map.Add("borrowed", Gpa(K64), K64, borrowed, owns: false);

        map.Dispose();

        Assert.Equal(0, owned.HostView);
        Assert.Equal(0, owned.GuestView);
        Assert.NotEqual(0, borrowed.HostView);
        Assert.Empty(map.Segments);
    }

    [Fact]
    public void A_sparse_region_costs_only_the_pages_touched()
    {
        const ulong touched = 4 * MiB;
        var shmemBefore = TestNative.StatusBytes("RssShmem");

        var region = new MemfdRegion("sparse", GiB);
        _map.Add("sparse", Gpa(0), GiB, region);
        Assert.Equal(0, TestNative.ResidentPages(region.GuestView, GiB));

        for (ulong a = 0; a < touched; a += 4096) _map.Write(Gpa(a), [0xFF]);

        // The memfd now has exactly the touched pages (2 MiB-aligned, so also with shmem THP);
        // the guest view sees them without having touched them.
        Assert.Equal((long)(touched / 4096), TestNative.ResidentPages(region.GuestView, GiB));
        var grown = TestNative.StatusBytes("RssShmem") - shmemBefore;
        Assert.True(grown < 64 * (long)MiB, $"RssShmem grew by {grown / (double)MiB:F1} MiB after touching 4 MiB of a 1 GiB region");
    }
}
