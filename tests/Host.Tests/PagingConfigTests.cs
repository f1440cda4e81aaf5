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
}
