using System.CommandLine;
using Akka.Actor;
using Akka.Configuration;
using ActorVmm.Devices.Virtio;
using ActorVmm.Host;
using ActorVmm.Host.Boot;
using ActorVmm.Host.Config;
using ActorVmm.Host.Vm;
using ActorVmm.LibVmm;
using Xunit;

namespace ActorVmm.Host.Tests;

/// <summary>The network card's settings: <c>--net tap=NAME[,mac=...]</c>, <c>actorvmm.vm.net</c>, and the
/// builder's refusal of a TAP it cannot attach to, before anything of the VM exists.</summary>
public sealed class NetConfigTests
{
    private static VmConfig From(string hocon) =>
        VmConfig.From(ConfigurationFactory.ParseString(hocon).WithFallback(VmConfig.Load(null)));

    private static List<KeyValuePair<string, string>> Settings(params string[] args)
    {
        var options = new Cli.VmOptions();
        var command = new Command("run");
        options.AddTo(command);
        return options.Settings(command.Parse(args), absolute: false);
    }

    [Fact]
    public void The_net_option_becomes_the_tap_and_mac_settings()
    {
        Assert.Equal(
            [new("actorvmm.vm.net.tap", "tap0"), new("actorvmm.vm.net.mac", "52:54:00:12:34:56")],
            Settings("--net", "tap=tap0,mac=52:54:00:12:34:56").Where(s => s.Key.StartsWith("actorvmm.vm.net", StringComparison.Ordinal)));
        Assert.Equal([new("actorvmm.vm.net.tap", "vmtap")], Settings("--net", "tap=vmtap"));
        Assert.DoesNotContain(Settings("--rng"), s => s.Key.StartsWith("actorvmm.vm.net", StringComparison.Ordinal));
    }

    [Theory]
    [InlineData("tap0", "tap=NAME")]
    [InlineData("mac=52:54:00:12:34:56", "tap=NAME is required")]
    [InlineData("tap=", "tap=NAME is required")]
    [InlineData("tap=a,tap=b", "tap is given twice")]
    [InlineData("tap=a,mtu=9000", "\"mtu=9000\" is neither")]
    [InlineData("tap=a,mac=", "mac= needs an address")]
    public void A_malformed_net_option_is_refused_naming_it(string value, string problem)
    {
        var e = Assert.Throws<ConfigException>(() => Settings("--net", value));
        Assert.Contains("--net", e.Message);
        Assert.Contains(problem, e.Message);
    }

    [Fact]
    public void The_net_setting_gives_the_tap_and_the_mac()
    {
        var vm = From("actorvmm.vm { name = n1, net = { tap = tap0, mac = \"02:00:00:00:00:07\" } }");
        Assert.Equal(new NetSpec("tap0", new MacAddress(0x0200_0000_0007)), vm.Net);
        Assert.Null(From("actorvmm.vm.name = n1").Net);
    }

    [Fact]
    public void Without_a_mac_the_card_gets_one_from_the_vm_name_in_qemus_prefix()
    {
        var a = From("actorvmm.vm { name = alpha, net.tap = tap0 }").Net!.Mac;
        var b = From("actorvmm.vm { name = beta, net.tap = tap0 }").Net!.Mac;
        Assert.Equal(a, From("actorvmm.vm { name = alpha, net.tap = tap1 }").Net!.Mac); // the same VM keeps it
        Assert.NotEqual(a, b);
        Assert.StartsWith("52:54:00:", a.ToString());
        Assert.False(a.IsMulticast);
    }

    [Theory]
    [InlineData("net.tap = \"a/b\"", "actorvmm.vm.net.tap")]
    [InlineData("net.tap = \"averyveryverylongname\"", "actorvmm.vm.net.tap")]
    [InlineData("net.tap = \"tap%d\"", "actorvmm.vm.net.tap")]
    [InlineData("net { tap = tap0, mac = \"52:54:00:12:34\" }", "actorvmm.vm.net.mac")]
    [InlineData("net { tap = tap0, mac = \"zz:54:00:12:34:56\" }", "actorvmm.vm.net.mac")]
    [InlineData("net { tap = tap0, mac = \"01:00:5e:00:00:01\" }", "multicast")]
    [InlineData("net.mac = \"52:54:00:12:34:56\"", "actorvmm.vm.net.tap is empty")]
    [InlineData("net.tap = tap0, paging.enabled = on", "actorvmm.vm.net")]
    public void Bad_net_settings_are_config_exceptions_naming_the_key(string setting, string key)
    {
        var e = Assert.Throws<ConfigException>(() => From($"actorvmm.vm {{ {setting} }}"));
        Assert.Contains(key, e.Message);
    }

    /// <summary>The builder attaches before it opens KVM or lays out memory: a TAP that is not there is a
    /// build error that says how to make one, on any host (no KVM, no root needed).</summary>
    [Fact]
    public void A_missing_tap_is_refused_before_the_vm_is_built()
    {
        var spec = new VmSpec("net", 16 << 20, 1, new FlatImage([0xF4], 0x7C00, 0, 0x7C00)) { Net = new NetSpec("avm-no-such", new MacAddress(0x5254_0000_0001)) };
        var never = new TaskCompletionSource<ActorSystem>().Task; // the actor system is never needed
        var e = Assert.Throws<VmBuildException>(() => new VmBuilder(never, spec).Start());
        Assert.Contains("\"avm-no-such\" does not exist", e.Message);
        Assert.Contains("ip tuntap add avm-no-such mode tap", e.Message);
    }

    /// <summary>An interface that exists but is no TAP (loopback) is refused by the kernel's TUNSETIFF; the
    /// builder says what it is.</summary>
    [Fact]
    public void An_interface_that_is_not_a_tap_is_refused_before_the_vm_is_built()
    {
        var spec = new VmSpec("net", 16 << 20, 1, new FlatImage([0xF4], 0x7C00, 0, 0x7C00)) { Net = new NetSpec("lo", new MacAddress(0x5254_0000_0001)) };
        var e = Assert.Throws<VmBuildException>(() => new VmBuilder(new TaskCompletionSource<ActorSystem>().Task, spec).Start());
        Assert.Contains("TAP \"lo\"", e.Message);
    }
}
