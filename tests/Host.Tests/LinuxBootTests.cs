using System.Buffers.Binary;
using System.Text;
using ActorVmm.Host.Boot;
using ActorVmm.LibVmm;
using ActorVmm.Memory;
using ActorVmm.Vcpu;
using Xunit;

namespace ActorVmm.Host.Tests;

/// <summary>
/// The Linux 64-bit boot protocol loader, byte for byte: what it writes into guest memory (zero
/// page, E820 map, command line, initrd, kernel, GDT, page tables) and the vcpu state it asks for,
/// against a synthetic bzImage and the real Debian kernel; and one refusal per image check.
/// Offsets are written out here from arch/x86/include/uapi/asm/bootparam.h, not taken from the loader.
/// </summary>
public sealed class LinuxBootTests
{
    private const ulong MiB = 1UL << 20;

    private static byte[] Read(GuestMemoryMap m, ulong address, int length)
    {
        var b = new byte[length];
        m.Read(new GuestPhysAddr(address), b);
        return b;
    }

    private static SpecialRegisterState Apply(BootState boot)
    {
        var seg = new SegmentState(0, 0, 0xFFFF, 3, true, 0, false, true, false, false, false);
        var initial = new SpecialRegisterState(seg, seg, seg, seg, seg, seg, seg, seg, new TableState(0, 0xFFFF),
            new TableState(0, 0xFFFF), 0x10, 0, 0, 0, 0, 0, 0xFEE0_0900);
        return boot.Special!(initial);
    }

    private static void Entry(byte[] zp, int index, ulong address, ulong size, uint type)
    {
        var at = 0x2D0 + 20 * index;
        BinaryPrimitives.WriteUInt64LittleEndian(zp.AsSpan(at), address);
        BinaryPrimitives.WriteUInt64LittleEndian(zp.AsSpan(at + 8), size);
        BinaryPrimitives.WriteUInt32LittleEndian(zp.AsSpan(at + 16), type);
    }

    /// <summary>The E820 map of a guest with <paramref name="ramBytes"/> below the MMIO hole and no firmware.</summary>
    private static (ulong, ulong, uint)[] PcMap(ulong lowRamEnd, ulong highRam = 0)
    {
        var map = new List<(ulong, ulong, uint)>
        {
            (0, 0x9FC00, 1),                            // conventional memory
            (0x9FC00, 0x400, 2),                        // EBDA
            (0xF0000, 0x10000, 2),                      // BIOS area: MP and ACPI tables
            (0x10_0000, lowRamEnd - 0x10_0000, 1),      // RAM from 1 MiB
            (0xFEC0_0000, 0x1000, 2),                   // IOAPIC
            (0xFEE0_0000, 0x1000, 2),                   // local APIC
            (0xFFFB_C000, 0x4000, 2),                   // KVM's identity-map page and real-mode TSS
        };
        if (highRam > 0) map.Add((0x1_0000_0000, highRam, 1));
        return [.. map];
    }

    [Fact]
    public void The_zero_page_is_the_images_setup_header_plus_the_loaders_fields_and_the_e820_map()
    {
        using var memory = VmspaceLayout.Build(256 * MiB);
        var kernel = TestBzImage.Build();
        var initrd = Enumerable.Range(0, 10_000).Select(i => (byte)(i * 13)).ToArray();
        new LinuxImage(kernel, "console=ttyS0 quiet", initrd).Load(memory);

        var expected = new byte[4096];
        kernel.AsSpan(0x1F1, 0x26C - 0x1F1).CopyTo(expected.AsSpan(0x1F1)); // the header, to 0x202 + jump offset 0x6A
        BinaryPrimitives.WriteUInt16LittleEndian(expected.AsSpan(0x1FA), 0xFFFF);    // vid_mode: normal
        expected[0x210] = 0xFF;                                                       // type_of_loader: undefined
        BinaryPrimitives.WriteUInt32LittleEndian(expected.AsSpan(0x214), 0x100_0000); // code32_start: the load address
        var initrdAt = (256 * MiB - 10_000) & ~0xFFFUL;
        BinaryPrimitives.WriteUInt32LittleEndian(expected.AsSpan(0x218), (uint)initrdAt); // ramdisk_image
        BinaryPrimitives.WriteUInt32LittleEndian(expected.AsSpan(0x21C), 10_000);         // ramdisk_size
        BinaryPrimitives.WriteUInt32LittleEndian(expected.AsSpan(0x228), 0x20000);        // cmd_line_ptr
        var map = PcMap(256 * MiB);
        expected[0x1E8] = (byte)map.Length;
        for (var i = 0; i < map.Length; i++) Entry(expected, i, map[i].Item1, map[i].Item2, map[i].Item3);

        Assert.Equal(expected, Read(memory, 0x8000, 4096));
    }

    [Fact]
    public void The_e820_map_reserves_the_bios_areas_and_the_platforms_fixed_mmio_and_lists_ram_above_4_gib()
    {
        using var memory = VmspaceLayout.Build(4096 * MiB);
        new LinuxImage(TestBzImage.Build(), "").Load(memory);
        var zp = Read(memory, 0x8000, 4096);
        var map = PcMap(0xC000_0000, highRam: 1024 * MiB);
        Array.Sort(map, (a, b) => a.Item1.CompareTo(b.Item1));
        var expected = new byte[20 * map.Length];
        for (var i = 0; i < map.Length; i++)
        {
            BinaryPrimitives.WriteUInt64LittleEndian(expected.AsSpan(20 * i), map[i].Item1);
            BinaryPrimitives.WriteUInt64LittleEndian(expected.AsSpan(20 * i + 8), map[i].Item2);
            BinaryPrimitives.WriteUInt32LittleEndian(expected.AsSpan(20 * i + 16), map[i].Item3);
        }
        Assert.Equal(map.Length, zp[0x1E8]);
        Assert.Equal(expected, zp.AsSpan(0x2D0, expected.Length).ToArray());
        Assert.All(zp.AsSpan(0x2D0 + expected.Length, 20).ToArray(), b => Assert.Equal(0, b)); // nothing after the last entry
    }

    [Fact]
    public void The_command_line_is_nul_terminated_where_cmd_line_ptr_points()
    {
        using var memory = VmspaceLayout.Build(64 * MiB);
        memory.Write(new GuestPhysAddr(0x20000), Enumerable.Repeat((byte)0x55, 64).ToArray()); // not zero beforehand
        new LinuxImage(TestBzImage.Build(), "console=ttyS0 root=/dev/vda rw").Load(memory);
        var ptr = BinaryPrimitives.ReadUInt32LittleEndian(Read(memory, 0x8000 + 0x228, 4));
        Assert.Equal(0u, BinaryPrimitives.ReadUInt32LittleEndian(Read(memory, 0x8000 + 0x0C8, 4))); // ext_cmd_line_ptr
        Assert.Equal([.. Encoding.ASCII.GetBytes("console=ttyS0 root=/dev/vda rw"), 0], Read(memory, ptr, 31));
    }

    [Fact]
    public void The_protected_mode_kernel_is_copied_to_pref_address_without_what_follows_syssize()
    {
        using var memory = VmspaceLayout.Build(64 * MiB);
        memory.Write(new GuestPhysAddr(0x100_0000 + 0x1000), Enumerable.Repeat((byte)0x55, 16).ToArray());
        var kernel = TestBzImage.Build(new TestBzImage.Fields { TrailingBytes = 16 });
        new LinuxImage(kernel, "").Load(memory);
        Assert.Equal(kernel.AsSpan(5 * 512, 0x1000).ToArray(), Read(memory, 0x100_0000, 0x1000));
        Assert.Equal(Enumerable.Repeat((byte)0x55, 16).ToArray(), Read(memory, 0x100_0000 + 0x1000, 16)); // the 0xEE trailer stays out
    }

    [Fact]
    public void A_relocatable_kernel_loads_at_pref_address_aligned_up_to_kernel_alignment()
    {
        using var memory = VmspaceLayout.Build(64 * MiB);
        var boot = new LinuxImage(TestBzImage.Build(new TestBzImage.Fields { PrefAddress = 0x110_0000 }), "").Load(memory);
        Assert.Equal(0x120_0000UL + 0x200, boot.Registers!.Rip);
        Assert.Equal(0x120_0000u, BinaryPrimitives.ReadUInt32LittleEndian(Read(memory, 0x8000 + 0x214, 4)));
        var fixedKernel = new LinuxImage(TestBzImage.Build(new TestBzImage.Fields { PrefAddress = 0x110_0000, Relocatable = 0 }), "").Load(memory);
        Assert.Equal(0x110_0000UL + 0x200, fixedKernel.Registers!.Rip);
    }

    [Theory]
    [InlineData(256, 0x7FFF_FFFF, 5000, 0x1000_0000)]     // RAM's end is the ceiling
    [InlineData(256, 0x07FF_FFFF, 5000, 0x0800_0000)]     // initrd_addr_max is: below 128 MiB
    [InlineData(4096, 0xFFFF_FFFF, 0x2000, 0xC000_0000)]  // the MMIO hole is: RAM below it ends at 3 GiB
    public void The_initrd_is_page_aligned_as_high_as_ram_initrd_addr_max_and_the_hole_allow(int ramMiB, uint initrdAddrMax, int size, ulong ceiling)
    {
        using var memory = VmspaceLayout.Build((ulong)ramMiB * MiB);
        var initrd = Enumerable.Range(0, size).Select(i => (byte)(i * 31 + 7)).ToArray();
        new LinuxImage(TestBzImage.Build(new TestBzImage.Fields { InitrdAddrMax = initrdAddrMax }), "", initrd).Load(memory);
        var at = (ceiling - (ulong)size) & ~0xFFFUL;
        Assert.Equal((uint)at, BinaryPrimitives.ReadUInt32LittleEndian(Read(memory, 0x8000 + 0x218, 4)));
        Assert.Equal((uint)size, BinaryPrimitives.ReadUInt32LittleEndian(Read(memory, 0x8000 + 0x21C, 4)));
        Assert.Equal(0u, BinaryPrimitives.ReadUInt32LittleEndian(Read(memory, 0x8000 + 0x0C0, 4))); // ext_ramdisk_image
        Assert.Equal(initrd, Read(memory, at, size));
    }

    [Fact]
    public void The_page_tables_identity_map_the_low_4_gib_with_2_mib_pages_and_the_gdt_has_boot_cs_and_boot_ds()
    {
        using var memory = VmspaceLayout.Build(64 * MiB);
        new LinuxImage(TestBzImage.Build(), "").Load(memory);

        var expected = new byte[0x6000];
        BinaryPrimitives.WriteUInt64LittleEndian(expected.AsSpan(0), 0x3000 | 0b11);                 // PML4[0] → PDPT, P|RW
        for (var g = 0; g < 4; g++)
        {
            BinaryPrimitives.WriteUInt64LittleEndian(expected.AsSpan(0x1000 + 8 * g), (ulong)(0x4000 + 0x1000 * g) | 0b11);
            for (var i = 0; i < 512; i++)
                BinaryPrimitives.WriteUInt64LittleEndian(expected.AsSpan(0x2000 + 0x1000 * g + 8 * i),
                    ((ulong)g << 30) | ((ulong)i << 21) | 0b1000_0011); // P|RW|PS
        }
        Assert.Equal(expected, Read(memory, 0x2000, 0x6000));

        var gdt = Read(memory, 0x1000, 32);
        Assert.Equal(0UL, BinaryPrimitives.ReadUInt64LittleEndian(gdt.AsSpan(0)));
        Assert.Equal(0x00AF_9B00_0000_FFFFUL, BinaryPrimitives.ReadUInt64LittleEndian(gdt.AsSpan(0x10))); // __BOOT_CS: L, execute/read
        Assert.Equal(0x00CF_9300_0000_FFFFUL, BinaryPrimitives.ReadUInt64LittleEndian(gdt.AsSpan(0x18))); // __BOOT_DS: read/write
    }

    [Fact]
    public void The_kernel_is_entered_at_its_64_bit_entry_with_rsi_the_zero_page_paging_on_and_interrupts_off()
    {
        using var memory = VmspaceLayout.Build(64 * MiB);
        var boot = new LinuxImage(TestBzImage.Build(), "").Load(memory);
        Assert.Equal(0x100_0200UL, boot.Registers!.Rip);
        Assert.Equal(0x8000UL, boot.Registers.Rsi);
        Assert.Equal(0x2UL, boot.Registers.Rflags); // IF clear
        var s = Apply(boot);
        Assert.Equal(0x10, s.Cs.Selector);
        Assert.True(s.Cs.Long);
        foreach (var d in new[] { s.Ds, s.Es, s.Ss }) Assert.Equal(0x18, d.Selector);
        Assert.Equal(0x1000UL, s.Gdt.Base);
        Assert.Equal(31, s.Gdt.Limit);
        Assert.Equal(0x2000UL, s.Cr3);
        Assert.NotEqual(0UL, s.Cr0 & SpecialRegisterState.Cr0Pg);
        Assert.NotEqual(0UL, s.Cr0 & SpecialRegisterState.Cr0Pe);
        Assert.NotEqual(0UL, s.Cr4 & SpecialRegisterState.Cr4Pae);
        Assert.Equal(SpecialRegisterState.EferLme | SpecialRegisterState.EferLma, s.Efer);
    }

    // ---- refusals: one per check, each naming what is wrong ----

    public static TheoryData<string, string> BadImages => new()
    {
        { "no-magic", "no \"HdrS\"" },
        { "short-header", "setup header ends at 0x240" },
        { "old-protocol", "boot protocol 2.11 is too old" },
        { "no-kernel-64", "lacks XLF_KERNEL_64" },
        { "zimage", "lacks LOADED_HIGH" },
        { "setup-sects", "setup_sects 64 is above 63" },
        { "no-protected-mode", "no protected-mode kernel follows" },
        { "syssize-zero", "syssize is 0" },
        { "truncated", "the file is truncated" },
        { "alignment", "kernel_alignment 0x300000 is not a power of two" },
        { "no-pref-address", "gives no pref_address" },
        { "pref-address-wraps", "is beyond the address space" },
        { "init-size-small", "init_size 0x800 is smaller than the protected-mode kernel" },
        { "init-size-ram", "the kernel needs init_size 0x4000000 bytes of RAM at 0x1000000" },
        { "cmdline", "the command line is 13 bytes; the kernel takes at most 12 (cmdline_size)" },
        { "initrd-max", "the initrd of 8192 bytes does not fit" },
        { "initrd-ram", "the initrd of 50331648 bytes does not fit" },
        { "initrd-empty", "the initrd is empty" },
    };

    [Theory]
    [MemberData(nameof(BadImages))]
    public void A_kernel_the_loader_cannot_boot_is_refused_naming_what_is_wrong(string bad, string message)
    {
        using var memory = VmspaceLayout.Build(64 * MiB);
        var f = new TestBzImage.Fields();
        byte[]? initrd = null;
        var cmdline = "console=ttyS0";
        byte[] kernel;
        switch (bad)
        {
            case "no-magic": kernel = TestBzImage.Build(f with { Magic = false }); break;
            case "short-header": kernel = TestBzImage.Build(f with { JumpOffset = 0x3E }); break;
            case "old-protocol": kernel = TestBzImage.Build(f with { Version = 0x020B }); break;
            case "no-kernel-64": kernel = TestBzImage.Build(f with { Xloadflags = 0b10 }); break;
            case "zimage": kernel = TestBzImage.Build(f with { Loadflags = 0 }); break;
            case "setup-sects": kernel = TestBzImage.Build(f with { SetupSects = 64 }); break;
            case "no-protected-mode": kernel = TestBzImage.Build(f)[..(5 * 512)]; break;
            case "syssize-zero": kernel = TestBzImage.Build(f with { Syssize = 0 }); break;
            case "truncated": kernel = TestBzImage.Build(f)[..(5 * 512 + 0x800)]; break;
            case "alignment": kernel = TestBzImage.Build(f with { KernelAlignment = 0x30_0000 }); break;
            case "no-pref-address": kernel = TestBzImage.Build(f with { Relocatable = 0, PrefAddress = 0 }); break;
            case "pref-address-wraps": kernel = TestBzImage.Build(f with { PrefAddress = 0xFFFF_FFFF_FFF0_0000 }); break;
            case "init-size-small": kernel = TestBzImage.Build(f with { InitSize = 0x800 }); break;
            case "init-size-ram": kernel = TestBzImage.Build(f with { InitSize = 0x400_0000 }); break; // 16 + 64 MiB > 64 MiB
            case "cmdline": kernel = TestBzImage.Build(f with { CmdlineSize = 12 }); break;
            case "initrd-max":
                kernel = TestBzImage.Build(f with { InitrdAddrMax = 0x140_0FFF }); // just above the kernel's end
                initrd = new byte[8192];
                break;
            case "initrd-ram":
                kernel = TestBzImage.Build(f);
                initrd = new byte[48 * MiB]; // 64 MiB of RAM, the kernel's init_size area ends at 20 MiB: 44 MiB above it
                break;
            case "initrd-empty":
                kernel = TestBzImage.Build(f);
                initrd = [];
                break;
            default: throw new ArgumentException(bad);
        }
        var e = Assert.Throws<BootException>(() => new LinuxImage(kernel, cmdline, initrd).Load(memory));
        Assert.Contains(message, e.Message);
    }

    [Fact]
    public void A_bzimage_is_recognised_and_checked_before_the_vm_is_built()
    {
        Assert.IsType<LinuxImage>(KernelKind.Recognise(TestBzImage.Build(), "bz", "console=ttyS0", [1, 2, 3]));
        var e = Assert.Throws<BootException>(() => KernelKind.Recognise(TestBzImage.Build(new TestBzImage.Fields { Version = 0x0204 }), "bz", "", null));
        Assert.Contains("boot protocol 2.04 is too old", e.Message);
    }

    // ---- the guest kit's Debian kernel ----

    [GuestKitFact]
    public void The_debian_kernel_loads_with_its_own_header_in_the_zero_page_and_its_initrd_below_ram_end()
    {
        Assert.True(GuestKit.Missing is null, GuestKit.Missing);
        var kernel = File.ReadAllBytes(GuestKit.Vmlinuz!);
        var initrd = File.ReadAllBytes(GuestKit.Initrd!);
        using var memory = VmspaceLayout.Build(256 * MiB);
        var boot = ((LinuxImage)KernelKind.Recognise(kernel, "vmlinuz", "console=ttyS0", initrd)).Load(memory);

        var h = LinuxImage.ReadHeader(kernel);
        Assert.True(h.Version >= 0x020C);
        var load = BinaryPrimitives.ReadUInt64LittleEndian(kernel.AsSpan(0x258)); // pref_address, 2 MiB aligned
        Assert.Equal(load + 0x200, boot.Registers!.Rip);
        var setupEnd = (kernel[0x1F1] + 1) * 512;
        var syssize = BinaryPrimitives.ReadUInt32LittleEndian(kernel.AsSpan(0x1F4)) * 16;
        Assert.Equal(kernel.AsSpan(setupEnd, (int)syssize).ToArray(), Read(memory, load, (int)syssize));

        var zp = Read(memory, 0x8000, 4096);
        var headerEnd = 0x202 + kernel[0x201];
        var header = kernel.AsSpan(0x1F1, headerEnd - 0x1F1).ToArray();
        // The loader's writes, applied to the image's header, are the zero page's header.
        BinaryPrimitives.WriteUInt16LittleEndian(header.AsSpan(0x1FA - 0x1F1), 0xFFFF);
        header[0x210 - 0x1F1] = 0xFF;
        BinaryPrimitives.WriteUInt32LittleEndian(header.AsSpan(0x214 - 0x1F1), (uint)load);
        var initrdAt = (256 * MiB - (ulong)initrd.Length) & ~0xFFFUL;
        BinaryPrimitives.WriteUInt32LittleEndian(header.AsSpan(0x218 - 0x1F1), (uint)initrdAt);
        BinaryPrimitives.WriteUInt32LittleEndian(header.AsSpan(0x21C - 0x1F1), (uint)initrd.Length);
        BinaryPrimitives.WriteUInt32LittleEndian(header.AsSpan(0x228 - 0x1F1), 0x20000);
        Assert.Equal(header, zp.AsSpan(0x1F1, header.Length).ToArray());
        Assert.All(zp.AsSpan(0, 0x1E8).ToArray(), b => Assert.Equal(0, b));
        Assert.True(initrdAt >= load + BinaryPrimitives.ReadUInt32LittleEndian(kernel.AsSpan(0x260)), "the initrd is above the kernel's init_size area");
        Assert.Equal(initrd, Read(memory, initrdAt, initrd.Length));
    }
}
