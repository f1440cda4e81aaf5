using ActorVmm.Host.Config;
using Akka.Configuration;
using Xunit;

namespace ActorVmm.Host.Tests;

public sealed class PagingConfigTests
{
    private static VmConfig Parse(string hocon) =>
        VmConfig.From(ConfigurationFactory.ParseString(hocon).WithFallback(VmConfig.Load(null)));

    [Fact]
    public void Paging_is_off_by_default_and_on_when_asked_with_its_limit_and_swap_file()
    {
        Assert.Null(Parse("").Paging);
        var p = Parse("actorvmm.vm.paging { enabled = on, resident-limit = 8M, swap-file = \"/tmp/x.swap\" }").Paging!;
        Assert.True(p.Userfaultfd);
        Assert.Equal(8UL << 20, p.ResidentLimitBytes);
        Assert.Equal("/tmp/x.swap", p.SwapFile);
    }

    [Fact]
    public void A_resident_limit_without_a_swap_file_is_refused_by_name()
    {
        var e = Assert.Throws<ConfigException>(() => Parse("actorvmm.vm.paging { enabled = on, resident-limit = 8M }"));
        Assert.Contains("swap-file", e.Message);
        Assert.Contains("resident-limit", Assert.Throws<ConfigException>(() =>
            Parse("actorvmm.vm.paging { enabled = on, resident-limit = 8Q, swap-file = s }")).Message);
    }

    [Fact]
    public void The_swapper_scans_every_second_by_default_with_a_swap_file_and_not_without_one()
    {
        var p = Parse("actorvmm.vm.paging { enabled = on, swap-file = s }").Paging!;
        Assert.Equal((TimeSpan.FromSeconds(1), 2), (p.ScanInterval, p.ColdScans));
        p = Parse("actorvmm.vm.paging { enabled = on, swap-file = s, scan-interval = 250ms, cold-scans = 4 }").Paging!;
        Assert.Equal((TimeSpan.FromMilliseconds(250), 4), (p.ScanInterval, p.ColdScans));
        Assert.Equal(TimeSpan.Zero, Parse("actorvmm.vm.paging { enabled = on, swap-file = s, scan-interval = 0 }").Paging!.ScanInterval);
        Assert.Equal(TimeSpan.Zero, Parse("actorvmm.vm.paging { enabled = on }").Paging!.ScanInterval); // nowhere to swap to
    }

    [Theory]
    [InlineData("scan-interval = -1s", "scan-interval")]
    [InlineData("scan-interval = soon", "scan-interval")]
    [InlineData("scan-interval = 2d", "scan-interval")]
    [InlineData("cold-scans = 0", "cold-scans")]
    [InlineData("cold-scans = 300", "cold-scans")]
    public void Bad_swapper_settings_are_refused_by_name(string setting, string key)
    {
        var e = Assert.Throws<ConfigException>(() => Parse($"actorvmm.vm.paging {{ enabled = on, swap-file = s, {setting} }}"));
        Assert.Contains(key, e.Message);
    }

    [Fact]
    public void Superpages_are_on_by_default_and_can_be_turned_off()
    {
        Assert.True(Parse("").Superpages);
        Assert.False(Parse("actorvmm.vm.paging.superpages = off").Superpages);
    }
}
