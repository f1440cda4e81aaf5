namespace ActorVmm.LibVmm.Tests;

/// <summary><see cref="CpuidPolicy"/> on a synthetic KVM_GET_SUPPORTED_CPUID answer.</summary>
public sealed class CpuidPolicyTests
{
    private const uint Sig = KvmCpuidEntry2.SignificantIndex;

    // Bits the platform defaults must leave alone (Intel SDM Vol 2A, CPUID).
    private const uint Leaf1EcxSse3 = 1u << 0, Leaf1EcxSse42 = 1u << 20;
    private const uint Leaf1EdxFpu = 1u << 0, Leaf1EdxSse2 = 1u << 26;
    private const uint Leaf7EbxBmi1 = 1u << 3, Leaf7EbxErms = 1u << 9;
    private const uint Leaf7EbxAvx512F = 1u << 16, Leaf7EbxAvx512Vl = 1u << 31;
    private const uint Leaf7EcxUmip = 1u << 2, Leaf7EcxAvx512Vbmi = 1u << 1;
    private const uint Leaf7EdxFsrm = 1u << 4, Leaf7EdxAvx512Vp2Intersect = 1u << 8;
    private const uint Leaf7Sub1EaxAvxVnni = 1u << 4, Leaf7Sub1EaxAvx512Bf16 = 1u << 5, Leaf7Sub1EaxFzlrm = 1u << 10;

    private const uint Leaf1EcxAll =
        Leaf1EcxSse3 | Leaf1EcxSse42 | CpuidPolicy.Leaf1EcxFma | CpuidPolicy.Leaf1EcxCx16 |
        CpuidPolicy.Leaf1EcxX2Apic | CpuidPolicy.Leaf1EcxTscDeadline | CpuidPolicy.Leaf1EcxXsave |
        CpuidPolicy.Leaf1EcxOsxsave | CpuidPolicy.Leaf1EcxAvx | CpuidPolicy.Leaf1EcxF16c;

    private static KvmCpuidEntry2 E(uint leaf, uint subleaf, uint flags, uint eax, uint ebx, uint ecx, uint edx) =>
        new() { Function = leaf, Index = subleaf, Flags = flags, Eax = eax, Ebx = ebx, Ecx = ecx, Edx = edx };

    private static KvmCpuidEntry2[] Supported() =>
    [
        E(0, 0, 0, 0x1F, 0x756E_6547, 0x6C65_746E, 0x4965_6E69), // "GenuineIntel"
        E(1, 0, 0, 0x0009_06EA, 0xAB08_0800, Leaf1EcxAll, Leaf1EdxFpu | Leaf1EdxSse2),
        E(7, 0, Sig, 1, Leaf7EbxBmi1 | Leaf7EbxErms | CpuidPolicy.Leaf7EbxAvx2 | Leaf7EbxAvx512F | Leaf7EbxAvx512Vl,
            Leaf7EcxUmip | Leaf7EcxAvx512Vbmi, Leaf7EdxFsrm | Leaf7EdxAvx512Vp2Intersect),
        E(7, 1, Sig, Leaf7Sub1EaxAvxVnni | Leaf7Sub1EaxAvx512Bf16 | Leaf7Sub1EaxFzlrm, 0, 0, 0),
        E(0xB, 0, Sig, 1, 1, 0x100, 0x55),
        E(0xB, 1, Sig, 4, 2, 0x201, 0x55),
        E(0xD, 0, Sig, 0x7, 0x340, 0x340, 0),
        E(0xD, 1, Sig, 0xF, 0, 0, 0),
        E(0x8000_0001, 0, 0, 0, 0, 0x121, 0x2C10_0800),
    ];

    private static KvmCpuidEntry2 Only(IEnumerable<KvmCpuidEntry2> entries, uint leaf, uint subleaf = 0) =>
        Assert.Single(entries, e => e.Function == leaf && e.Index == subleaf);

    [Fact]
    public void Platform_defaults_clear_cx16_xsave_and_avx_in_leaf_1_and_keep_the_rest()
    {
        var leaf1 = Only(CpuidPolicy.ForPlatform(Supported()).EntriesFor(0), 1);

        Assert.Equal(0u, leaf1.Ecx & CpuidPolicy.Leaf1EcxCx16);
        Assert.Equal(0u, leaf1.Ecx & (CpuidPolicy.Leaf1EcxXsave | CpuidPolicy.Leaf1EcxOsxsave));
        Assert.Equal(0u, leaf1.Ecx & (CpuidPolicy.Leaf1EcxAvx | CpuidPolicy.Leaf1EcxFma | CpuidPolicy.Leaf1EcxF16c));
        Assert.Equal(
            Leaf1EcxSse3 | Leaf1EcxSse42 | CpuidPolicy.Leaf1EcxX2Apic | CpuidPolicy.Leaf1EcxTscDeadline | CpuidPolicy.Leaf1EcxHypervisor,
            leaf1.Ecx);
        Assert.Equal(Leaf1EdxFpu | Leaf1EdxSse2, leaf1.Edx);
        Assert.Equal(0x0009_06EAu, leaf1.Eax);
    }

    [Fact]
    public void Platform_defaults_clear_avx2_and_avx512_in_leaf_7_and_keep_the_rest()
    {
        var entries = CpuidPolicy.ForPlatform(Supported()).EntriesFor(0);
        var sub0 = Only(entries, 7, 0);
        var sub1 = Only(entries, 7, 1);

        Assert.Equal(Leaf7EbxBmi1 | Leaf7EbxErms, sub0.Ebx);
        Assert.Equal(Leaf7EcxUmip, sub0.Ecx);
        Assert.Equal(Leaf7EdxFsrm, sub0.Edx);
        Assert.Equal(1u, sub0.Eax); // max subleaf
        Assert.Equal(Leaf7Sub1EaxFzlrm, sub1.Eax);
    }

    [Fact]
    public void Platform_defaults_drop_the_xsave_leaf_0xD()
    {
        var policy = CpuidPolicy.ForPlatform(Supported());

        Assert.DoesNotContain(policy.EntriesFor(0), e => e.Function == 0xD);
        Assert.Null(policy.Find(0xD));
        Assert.Equal(Supported().Length - 2, policy.EntriesFor(0).Length);
    }

    [Fact]
    public void A_policy_without_clears_keeps_leaf_0xD_and_every_feature()
    {
        var entries = new CpuidPolicy(Supported(), []).EntriesFor(0);

        Assert.Equal(2, entries.Count(e => e.Function == 0xD));
        Assert.Equal(Leaf1EcxAll | CpuidPolicy.Leaf1EcxHypervisor, Only(entries, 1).Ecx);
        Assert.Equal(Supported()[2].Ebx, Only(entries, 7, 0).Ebx);
    }

    [Fact]
    public void A_clear_for_one_subleaf_leaves_other_subleaves_alone()
    {
        var clear = new CpuidPolicy.Clear(0xB, 1, CpuidPolicy.Reg.Ecx, 0x200, "test");

        var entries = new CpuidPolicy(Supported(), [clear]).EntriesFor(0);

        Assert.Equal(0x100u, Only(entries, 0xB, 0).Ecx);
        Assert.Equal(0x001u, Only(entries, 0xB, 1).Ecx);
    }

    [Theory]
    [InlineData(0)]
    [InlineData(3)]
    [InlineData(255)]
    public void EntriesFor_puts_the_apic_id_in_leaf_1_and_leaf_0xB_and_sets_the_hypervisor_bit(int vcpu)
    {
        var entries = CpuidPolicy.ForPlatform(Supported()).EntriesFor(vcpu);

        var leaf1 = Only(entries, 1);
        Assert.Equal((uint)vcpu, leaf1.Ebx >> 24);
        Assert.Equal(0x08_0800u, leaf1.Ebx & 0x00FF_FFFF); // CLFLUSH size, logical count kept
        Assert.NotEqual(0u, leaf1.Ecx & CpuidPolicy.Leaf1EcxHypervisor);
        Assert.Equal((uint)vcpu, Only(entries, 0xB, 0).Edx);
        Assert.Equal((uint)vcpu, Only(entries, 0xB, 1).Edx);
        Assert.Equal(0x201u, Only(entries, 0xB, 1).Ecx); // level type and number kept
    }

    [Fact]
    public void EntriesFor_gives_each_vcpu_its_own_copy()
    {
        var policy = CpuidPolicy.ForPlatform(Supported());

        var a = policy.EntriesFor(1);
        var b = policy.EntriesFor(2);
        a[1].Eax = 0;

        Assert.Equal(1u, Only(a, 1).Ebx >> 24);
        Assert.Equal(2u, Only(b, 1).Ebx >> 24);
        Assert.Equal(0x0009_06EAu, Only(policy.EntriesFor(1), 1).Eax);
    }

    [Fact]
    public void The_policy_does_not_mutate_its_input()
    {
        var supported = Supported();

        var policy = CpuidPolicy.ForPlatform(supported);
        _ = policy.EntriesFor(7);

        Assert.Equal(Supported(), supported);
    }

    [Fact]
    public void Find_honours_the_significant_index_flag()
    {
        var policy = CpuidPolicy.ForPlatform(Supported());

        Assert.Equal(Leaf7Sub1EaxFzlrm, policy.Find(7, 1)?.Eax);
        Assert.Equal(1u, policy.Find(7, 0)?.Eax);
        Assert.Equal(0x0009_06EAu, policy.Find(1, subleaf: 5)?.Eax); // leaf 1 ignores ECX
        Assert.Null(policy.Find(0x4000_0000));
    }

    [Fact]
    public void Without_a_kernel_lapic_the_kvm_pv_features_that_need_one_are_hidden_and_the_others_kept()
    {
        const uint clock = 1u << 3, steal = 1u << 5, pvTlbFlush = 1u << 9, pvSchedYield = 1u << 13, clocksourceStable = 1u << 24;
        const uint kept = clock | steal | pvTlbFlush | pvSchedYield | clocksourceStable;
        const uint needsLapic = (1u << 4) | (1u << 6) | (1u << 7) | (1u << 10) | (1u << 11) | (1u << 14);
        KvmCpuidEntry2[] supported = [.. Supported(), E(0x4000_0000, 0, 0, 0x4000_0001, 0x4B4D_564B, 0x564B_4D56, 0x4D), E(0x4000_0001, 0, 0, kept | needsLapic, 0, 0, 0)];
        var emulated = CpuidPolicy.ForModel(supported, CpuModel.Host, hidden: CpuidPolicy.Hidden(kernelLapic: false));
        Assert.Equal(kept, Only(emulated.EntriesFor(0), 0x4000_0001).Eax);
        // With KVM's local APICs, all but PV_UNHALT (bit 7): a kicked spinlock waiter sleeps with IF=0.
        var assisted = CpuidPolicy.ForModel(supported, CpuModel.Host, hidden: CpuidPolicy.Hidden(kernelLapic: true));
        Assert.Equal(kept | (needsLapic & ~(1u << 7)), Only(assisted.EntriesFor(0), 0x4000_0001).Eax);
    }
}

/// <summary><see cref="CpuModel"/>: QEMU's -cpu syntax, and the policy it gives over a synthetic KVM answer.</summary>
public sealed class CpuModelTests
{
    private static KvmCpuidEntry2 E(uint leaf, uint subleaf, uint flags, uint eax, uint ebx, uint ecx, uint edx) =>
        new() { Function = leaf, Index = subleaf, Flags = flags, Eax = eax, Ebx = ebx, Ecx = ecx, Edx = edx };

    private const uint Pcid = 1u << 17, X2Apic = 1u << 21, TscDeadline = 1u << 24, Sse3 = 1u << 0;

    /// <summary>KVM supports x2APIC, PCID, TSC-deadline, SSE3 and XSAVE, not AVX; leaf 7 has SMEP.</summary>
    private static KvmCpuidEntry2[] Supported() =>
    [
        E(1, 0, 0, 0x906EA, 0, Sse3 | Pcid | X2Apic | TscDeadline | CpuidPolicy.Leaf1EcxXsave, 1u << 9),
        E(7, 0, KvmCpuidEntry2.SignificantIndex, 0, 1u << 7, 0, 0),
        E(0xD, 0, KvmCpuidEntry2.SignificantIndex, 7, 0x340, 0x340, 0),
    ];

    private static uint Leaf1Ecx(CpuModel model) => CpuidPolicy.ForModel(Supported(), model).Find(1)!.Value.Ecx;

    [Fact]
    public void Host_is_the_platform_policy()
    {
        Assert.Same(CpuModel.Host, CpuModel.Parse("host"));
        Assert.Equal(CpuidPolicy.ForPlatform(Supported()).EntriesFor(0), CpuidPolicy.ForModel(Supported(), CpuModel.Host).EntriesFor(0));
    }

    [Theory]
    [InlineData("host,-x2apic,-pcid,-tsc-deadline")]
    [InlineData("HOST, x2apic=off ,-PCID,tsc_deadline_timer=off")]
    [InlineData("host,+x2apic,-x2apic,-pcid,-tsc-deadline")]
    public void Removed_features_are_hidden_and_the_rest_kept(string spec)
    {
        var model = CpuModel.Parse(spec);

        Assert.Equal("host,-x2apic,-pcid,-tsc-deadline", model.ToString());
        Assert.True(model.Hides("x2apic") && model.Hides("tsc_deadline") && model.Hides("pcid"));
        Assert.Equal(Sse3 | CpuidPolicy.Leaf1EcxHypervisor, Leaf1Ecx(model) | CpuidPolicy.Leaf1EcxHypervisor);
        Assert.False(CpuidPolicy.ForModel(Supported(), model).Has(CpuModel.Feature("x2apic")));
        Assert.True(CpuidPolicy.ForModel(Supported(), model).Has(CpuModel.Feature("pni")));
    }

    [Fact]
    public void A_later_item_wins()
    {
        var model = CpuModel.Parse("host,-pcid,+pcid");
        Assert.NotEqual(0u, Leaf1Ecx(model) & Pcid);
        Assert.Equal("host,+pcid", model.ToString());
    }

    [Fact]
    public void Adding_a_feature_the_platform_hides_by_default_shows_it_when_kvm_supports_it()
    {
        Assert.Equal(0u, Leaf1Ecx(CpuModel.Host) & CpuidPolicy.Leaf1EcxXsave);
        var policy = CpuidPolicy.ForModel(Supported(), CpuModel.Parse("host,+xsave"));

        Assert.NotEqual(0u, policy.Find(1)!.Value.Ecx & CpuidPolicy.Leaf1EcxXsave);
        Assert.NotNull(policy.Find(0xD)); // the XSAVE leaf comes back with it
    }

    [Fact]
    public void Adding_a_feature_kvm_cannot_provide_is_refused_naming_it()
    {
        var e = Assert.Throws<ArgumentException>(() => CpuidPolicy.ForModel(Supported(), CpuModel.Parse("host,+avx,+smep,+rdrand")));
        Assert.EndsWith("cannot provide avx, rdrand", e.Message);
    }

    [Theory]
    [InlineData("", "starts with its base model")]
    [InlineData("skylake", "unknown base CPU model \"skylake\"")]
    [InlineData("host,-frobnicate", "unknown CPU feature \"frobnicate\" (known: fpu")]
    [InlineData("host,x2apic", "write +feature, -feature")]
    [InlineData("host,,-pcid", "an empty item")]
    [InlineData("host,-apic", "follows IA32_APIC_BASE.EN")]
    [InlineData("host,-hypervisor", "always set")]
    public void A_bad_model_is_refused_saying_why(string spec, string why) =>
        Assert.Contains(why, Assert.Throws<FormatException>(() => CpuModel.Parse(spec)).Message);
}

/// <summary>Features the VMM provides itself, beyond what KVM reports.</summary>
public sealed class ProvidedCpuFeatureTests
{
    private static KvmCpuidEntry2[] Supported() =>
    [
        new() { Function = 1, Ecx = 1u << 0 }, // SSE3 only: no TSC-deadline (KVM never reports it)
    ];

    [Fact]
    public void A_provided_feature_is_shown_and_may_be_removed_or_added_by_the_model()
    {
        var tscDeadline = CpuModel.Feature("tsc-deadline");
        Assert.False(CpuidPolicy.ForModel(Supported(), CpuModel.Host).Has(tscDeadline));
        Assert.True(CpuidPolicy.ForModel(Supported(), CpuModel.Host, [tscDeadline]).Has(tscDeadline));
        Assert.False(CpuidPolicy.ForModel(Supported(), CpuModel.Parse("host,-tsc-deadline"), [tscDeadline]).Has(tscDeadline));
        Assert.True(CpuidPolicy.ForModel(Supported(), CpuModel.Parse("host,+tsc-deadline"), [tscDeadline]).Has(tscDeadline));
        Assert.Throws<ArgumentException>(() => CpuidPolicy.ForModel(Supported(), CpuModel.Parse("host,+tsc-deadline")));
    }
}
