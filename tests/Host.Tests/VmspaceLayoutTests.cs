using ActorVmm.LibVmm;
using ActorVmm.Memory;

namespace ActorVmm.Host.Tests;

public sealed class VmspaceLayoutTests
{
    private const ulong KiB = 1 << 10, MiB = 1 << 20, GiB = 1 << 30;
    private const ulong FourGiB = 4 * GiB;

    private static ulong RamTotal(IReadOnlyList<LayoutRange> plan) =>
        plan.Where(r => r.Kind == LayoutKind.Ram).Aggregate(0UL, (a, r) => a + r.Size);

    private static void AssertNoOverlaps(IReadOnlyList<LayoutRange> plan)
    {
        var sorted = plan.OrderBy(r => r.Base.Value).ToArray();
        for (var i = 1; i < sorted.Length; i++)
            Assert.True(sorted[i - 1].Base.Value + sorted[i - 1].Size <= sorted[i].Base.Value,
                $"{sorted[i - 1].Name} overlaps {sorted[i].Name}");
    }

    [Fact]
    public void Small_ram_is_one_segment_at_zero()
    {
        var plan = VmspaceLayout.Plan(64 * MiB);
        Assert.Equal([new LayoutRange("ram-low", new GuestPhysAddr(0), 64 * MiB, LayoutKind.Ram)], plan);
    }

    [Fact]
    public void Ram_above_3G_continues_above_4G()
    {
        var plan = VmspaceLayout.Plan(4 * GiB);
        Assert.Equal(
            [
                new LayoutRange("ram-low", new GuestPhysAddr(0), 3 * GiB, LayoutKind.Ram),
                new LayoutRange("ram-high", new GuestPhysAddr(FourGiB), 1 * GiB, LayoutKind.Ram),
            ],
            plan);
    }

    [Fact]
    public void Exactly_3G_needs_no_high_segment()
    {
        var plan = VmspaceLayout.Plan(3 * GiB);
        Assert.Equal([new LayoutRange("ram-low", new GuestPhysAddr(0), 3 * GiB, LayoutKind.Ram)], plan);
    }

    [Fact]
    public void Firmware_sits_below_4G_with_a_low_alias_and_ram_keeps_its_size()
    {
        var plan = VmspaceLayout.Plan(64 * MiB, 64 * KiB);
        AssertNoOverlaps(plan);
        var firmware = Assert.Single(plan, r => r.Kind == LayoutKind.Firmware);
        Assert.Equal(FourGiB - 64 * KiB, firmware.Base.Value);
        Assert.Equal(64 * KiB, firmware.Size);
        var alias = Assert.Single(plan, r => r.Kind == LayoutKind.FirmwareAlias);
        Assert.Equal(0xF0000UL, alias.Base.Value);
        Assert.Equal(64 * KiB, alias.Size);
        Assert.Equal(64 * MiB, RamTotal(plan));
        // RAM stops where the alias begins and resumes at 1 MiB.
        Assert.Contains(new LayoutRange("ram-low", new GuestPhysAddr(0), 0xF0000, LayoutKind.Ram), plan);
        Assert.Contains(new LayoutRange("ram", new GuestPhysAddr(MiB), 63 * MiB, LayoutKind.Ram), plan);
    }

    [Fact]
    public void A_large_firmware_is_aliased_only_in_its_last_128K()
    {
        var plan = VmspaceLayout.Plan(16 * MiB, 1 * MiB);
        var alias = Assert.Single(plan, r => r.Kind == LayoutKind.FirmwareAlias);
        Assert.Equal(MiB - 128 * KiB, alias.Base.Value);
        Assert.Equal(128 * KiB, alias.Size);
        Assert.Equal(FourGiB - MiB, Assert.Single(plan, r => r.Kind == LayoutKind.Firmware).Base.Value);
        Assert.Equal(16 * MiB, RamTotal(plan));
        AssertNoOverlaps(plan);
    }

    [Theory]
    [InlineData(1 * MiB)]
    [InlineData(4 * GiB)]
    public void Ram_total_is_kept_with_firmware_at_the_edges(ulong ram)
    {
        var plan = VmspaceLayout.Plan(ram, 64 * KiB);
        Assert.Equal(ram, RamTotal(plan));
        AssertNoOverlaps(plan);
    }

    [Theory]
    [InlineData(0UL, "below the minimum")]
    [InlineData(MiB - 4096, "below the minimum")]
    [InlineData(MiB + 1, "not a multiple of 4 KiB")]
    [InlineData(64 * MiB + 512, "not a multiple of 4 KiB")]
    [InlineData((1UL << 40) + 4096, "above the maximum")]
    public void Impossible_sizes_are_refused(ulong ram, string reason)
    {
        Assert.Contains(reason, Assert.Throws<ArgumentException>(() => VmspaceLayout.Plan(ram)).Message);
        Assert.Contains(reason, Assert.Throws<ArgumentException>(() => VmspaceLayout.Build(ram)).Message);
    }

    [Fact]
    public void Firmware_over_16M_is_refused() =>
        Assert.Contains("16 MiB", Assert.Throws<ArgumentException>(() => VmspaceLayout.Plan(64 * MiB, 16 * MiB + 1)).Message);

    [Fact]
    public void Build_maps_every_planned_segment()
    {
        using var map = VmspaceLayout.Build(64 * MiB, new byte[64 * KiB]);
        var plan = VmspaceLayout.Plan(64 * MiB, 64 * KiB);
        Assert.Equal(
            plan.OrderBy(r => r.Base.Value).Select(r => (r.Name, r.Base.Value, r.Size, r.Kind != LayoutKind.Ram)),
            map.Segments.Select(s => (s.Name, s.Base.Value, s.Size, s.ReadOnly)));
        Assert.False(map.IsMapped(new GuestPhysAddr(64 * MiB + 64 * KiB), 1)); // past the relocated RAM above 4 GiB
        Assert.False(map.IsMapped(new GuestPhysAddr(3 * GiB), 1));
    }

    [Fact]
    public void Build_right_aligns_the_firmware_below_4G_and_aliases_it_below_1M()
    {
        var image = new byte[64 * KiB];
        for (var i = 0; i < image.Length; i++) image[i] = (byte)(i * 7 + 3);
        using var map = VmspaceLayout.Build(16 * MiB, image);

        var top = new byte[image.Length];
        map.Read(new GuestPhysAddr(FourGiB - (ulong)image.Length), top);
        Assert.Equal(image, top);
        var low = new byte[image.Length];
        map.Read(new GuestPhysAddr(0xF0000), low);
        Assert.Equal(image, low);

        var last = new byte[1];
        map.Read(new GuestPhysAddr(0xFFFF_FFFF), last);
        Assert.Equal(image[^1], last[0]);
        map.Read(new GuestPhysAddr(0xFFFFF), last);
        Assert.Equal(image[^1], last[0]);
    }

    [Fact]
    public void Build_right_aligns_a_firmware_that_is_not_a_page_multiple()
    {
        var image = new byte[1000];
        for (var i = 0; i < image.Length; i++) image[i] = (byte)(0xA0 ^ i);
        using var map = VmspaceLayout.Build(16 * MiB, image);
        var back = new byte[image.Length];
        map.Read(new GuestPhysAddr(FourGiB - 1000), back);
        Assert.Equal(image, back);
        map.Read(new GuestPhysAddr(MiB - 1000), back);
        Assert.Equal(image, back);
        // The padding in front of the image is zero.
        var pad = new byte[4096 - 1000];
        map.Read(new GuestPhysAddr(FourGiB - 4096), pad);
        Assert.All(pad, b => Assert.Equal(0, b));
    }

    [Fact]
    public void The_alias_and_the_top_share_their_bytes()
    {
        using var map = VmspaceLayout.Build(16 * MiB, new byte[64 * KiB]);
        map.Write(new GuestPhysAddr(0xFFFF_FFF0), [0xEA, 0x5B, 0xE0, 0x00, 0xF0]); // loaders may write firmware
        var low = new byte[5];
        map.Read(new GuestPhysAddr(0xFFFF0), low);
        Assert.Equal(new byte[] { 0xEA, 0x5B, 0xE0, 0x00, 0xF0 }, low);
    }

    [Fact]
    public void Ram_is_zero_filled_and_accesses_cross_segment_boundaries()
    {
        using var map = VmspaceLayout.Build(16 * MiB, new byte[64 * KiB]);
        var page = new byte[4096];
        map.Read(new GuestPhysAddr(0x7000), page);
        Assert.All(page, b => Assert.Equal(0, b));

        // 0xFFFFC..0x100003: the last 4 bytes of the alias (= of the firmware), then the first 4 of RAM at 1 MiB.
        map.Write(new GuestPhysAddr(0xFFFFC), [1, 2, 3, 4, 5, 6, 7, 8]);
        var firmwareTop = new byte[4];
        map.Read(new GuestPhysAddr(0xFFFF_FFFC), firmwareTop);
        Assert.Equal(new byte[] { 1, 2, 3, 4 }, firmwareTop);
        var ram = new byte[4];
        map.Read(new GuestPhysAddr(MiB), ram);
        Assert.Equal(new byte[] { 5, 6, 7, 8 }, ram);

        // A write running off the end of RAM writes nothing.
        Assert.False(map.TryWrite(new GuestPhysAddr(16 * MiB - 2), [9, 9, 9, 9]));
        var end = new byte[2];
        map.Read(new GuestPhysAddr(16 * MiB - 2), end);
        Assert.Equal(new byte[2], end);
    }

    [Fact]
    public void A_1G_guest_costs_nothing_until_touched()
    {
        using var map = VmspaceLayout.Build(1 * GiB);
        ulong Allocated() => map.Segments.Select(s => s.Backing).Distinct().Aggregate(0UL, (a, r) => a + r.AllocatedBytes);

        var before = Allocated();
        Assert.True(before < MiB, $"an untouched 1 GiB guest already has {before} bytes allocated");
        ulong[] pages = [0, 0x10_0000, 0x2000_0000, GiB - 4096];
        foreach (var p in pages) map.Write(new GuestPhysAddr(p), [1, 2, 3, 4]);
        var after = Allocated();
        Assert.True(after >= before + (ulong)pages.Length * 4096, $"allocated {before} -> {after} after touching {pages.Length} pages");
        Assert.True(after < 16 * MiB, $"touching {pages.Length} pages allocated {after} bytes");
    }
}
